"""Peer methods: what a user would train instead of the bootstrap, one ordinary network on the
same full-res images and partial views, measured beside it by the data-efficiency benchmark.

- `bootdiff.peers.ambient`: Ambient Diffusion Omni, the partial data σ-gated (lifted low-res
  copies only at high σ, crops only at low σ).
"""
