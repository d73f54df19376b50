"""Hydra configs of ``gradnorm-train`` (a package so Hydra can find them when installed)."""
