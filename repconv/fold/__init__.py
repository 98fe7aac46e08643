"""Fold: trace a module, lower its nodes with the rules, find the linear regions and fold each
into one `Affine`. Everything here reads; nothing changes the user's model (that is `rewrite`)."""
