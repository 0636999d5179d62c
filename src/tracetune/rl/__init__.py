"""Training past imitation: sample from the model, check the samples, learn from what the checkers say."""
