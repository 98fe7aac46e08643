"""The fuse driver: one pass over a model's scopes (capture, fold, apply) and passes at other
input sizes where the model decides on sizes, and the report they make."""
