"""Formats: every file repconv reads or writes (training checkpoints, deploy files in .pt,
.safetensors, .pt2 and .onnx, --inputs) and the validation of what they hold. Every file is
untrusted input (docs/design.md, "Trust")."""
