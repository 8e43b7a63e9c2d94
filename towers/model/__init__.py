"""Towers, loss and the LightningModule."""
