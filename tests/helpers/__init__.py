"""What the tests share, one of each; test files import from here, never from each other.

- ``tensors``: seeded inputs (``randn``) and a no-grad forward (``run``).
- ``measure``: what tests measure on models: conv/BN/linear counts, executed aten ops,
  scale-relative error ``rel_err(expected, got)``.
- ``reference_blocks``: the papers' blocks written from their equations, ``randomize_bn``.
- ``user_models``, ``user_models_detector``, ``user_models_wrappers``, ``token_models``: models
  written the way third-party code is.
- ``noisy_models``: deep conv-BN networks with large float32 rounding noise.
- ``export_models``: forwards that depend on being exported (a batch guard, an export branch).
- ``reference_framework``: a detector framework's loader, fuse() and EMA, written as they are.
- ``pickle_payloads``: objects training scripts save beside the weights, and hostile pickles.
- ``cli_support``: running the CLI in-process and as a process, and the checks every refused
  command must pass.

Markers (``needs_onnx``) and fixtures (the sample checkpoints) live in ``tests/conftest.py``.
"""
