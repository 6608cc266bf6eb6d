"""Training: state, pure steps, parallel strategies, checkpoints and the loop."""
