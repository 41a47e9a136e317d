"""FlowGRPO training on top of the diffusion rollout: replay, advantages, loss, rewards and the training loop."""
