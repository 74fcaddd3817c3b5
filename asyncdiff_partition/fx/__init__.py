"""The torch.fx backend: capture a model as one graph, adapt it to the op graph, profile it,
split it into segments and ship each rank its segment."""
