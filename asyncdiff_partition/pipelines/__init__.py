"""What drives the schedule: diffusers pipelines wrapped in place, plain loops, the model zoo
and the bundled digits model."""
