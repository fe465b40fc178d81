"""A short plain-language account of the schedule a policy chose for one sample."""

from __future__ import annotations


def explain(policy: str, steps: list[dict], nfe: int, budget: int) -> str:
    """E.g. ``"moe: 4 steps, 5 of 5 NFE. unipc at steps 1-3, heun at step 4. Router confidence
    0.41-0.99 (least sure at step 4). No fresh noise."``"""
    if not steps:
        return f"{policy}: no steps taken."
    parts = [f"{policy}: {len(steps)} step{'s' * (len(steps) != 1)}, {nfe} of {budget} NFE"]
    if nfe < budget:
        parts[0] += f" ({budget - nfe} left unused)"
    runs = []  # (expert, first step, last step), 1-based
    for i, step in enumerate(steps, start=1):
        if runs and runs[-1][0] == step["expert"]:
            runs[-1][2] = i
        else:
            runs.append([step["expert"], i, i])
    parts.append(
        ", ".join(f"{e} at step {a}" if a == b else f"{e} at steps {a}-{b}" for e, a, b in runs)
    )
    confidence = [s.get("confidence") for s in steps if s.get("confidence") is not None]
    if confidence:
        low = min(range(len(confidence)), key=confidence.__getitem__)
        parts.append(
            f"Router confidence {min(confidence):.2f}-{max(confidence):.2f} "
            f"(least sure at step {low + 1})"
        )
    noisy = [str(i) for i, s in enumerate(steps, start=1) if s["eta"] > 0]
    parts.append(f"Fresh noise at step(s) {', '.join(noisy)}" if noisy else "No fresh noise")
    final = steps[-1]["sigma"]
    parts.append(f"Last step from sigma {final:.3g} to 0")
    return ". ".join(parts) + "."
