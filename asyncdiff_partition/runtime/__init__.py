"""Running the schedule: the single-process reference, one rank's denoiser, the transport
(the only module that talks to torch.distributed), the launcher, reports and the `run` job."""
