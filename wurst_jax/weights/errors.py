"""The one exception the weight readers and the converter raise."""


class WeightsError(ValueError):
    """Weights or their config cannot be used: the message names the file and every problem found."""


def mismatch_error(headline: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> WeightsError:
    """One error listing every missing, unexpected and mis-shaped key under `headline` (which names the file)."""
    lines = [headline]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            lines.append(f"  {title} ({len(keys)}):")
            lines += [f"    {k}" for k in keys]
    return WeightsError("\n".join(lines))
