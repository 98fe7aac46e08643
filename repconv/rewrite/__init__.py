"""Rewrite: apply folded regions to the user's model where their ops run, record each change as a
plan step, and replay a recorded plan on a freshly built model. The only stage that mutates."""
