"""Original-layout (remote-code) InternVL checkpoints served as transformers-native ones."""
