"""Adversarial robustness: attacks, adversarial training and retraining, and evaluation."""
