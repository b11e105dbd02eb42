"""Networks to retrain and evaluate: the DARTS evaluation network built from a genotype and the
baselines (ResNet-18, MobileNet-V2, WideResNets). Nothing here imports attacks, training or
Lipschitz bounds."""
