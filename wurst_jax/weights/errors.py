"""The one exception the weight readers and the converter raise."""


class WeightsError(ValueError):
    """Weights or their config cannot be used: the message names the file and every problem found."""
