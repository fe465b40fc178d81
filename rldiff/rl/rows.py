"""Many samples per agent: the row layout of an observation and per-row advantages.

An agent of ``RoutingEnv`` acts on every sample of the batch at once: its observation is a matrix
``[B, ROW_WIDTH]``, one row per sample, laid out as

- columns ``0 .. OBS_DIM - 1``: the sample's features (``observation_vector``; zeros once the
  sample is finished),
- column ``ACTS``: 1 where the agent acts on the sample at this step, else 0,
- column ``REWARD``: the reward the sample brought this agent since the agent's last observation.

Seen from one sample ``i``, an agent's rows are the trajectory that a per-sample agent would have:
its actions are the steps where ``ACTS`` is 1, and the rewards in between accumulate onto the last
of them (exactly what RLlib does for an agent that receives a reward without an observation).
``row_advantages`` computes GAE along these per-sample trajectories, all samples at once.
"""

from __future__ import annotations

import numpy as np

from rldiff.core.routing import OBS_DIM

ACTS = OBS_DIM
REWARD = OBS_DIM + 1
ROW_WIDTH = OBS_DIM + 2


def row_observation(batch: int, rows, features, acting, rewards) -> np.ndarray:
    """The ``[batch, ROW_WIDTH]`` float32 observation: ``features`` ``[len(rows), OBS_DIM]`` on
    ``rows``, ``ACTS`` 1 on ``acting`` (row indices), ``rewards`` ``[batch]`` in ``REWARD``."""
    out = np.zeros((batch, ROW_WIDTH), np.float32)
    out[rows, :OBS_DIM] = features
    out[acting, ACTS] = 1.0
    out[:, REWARD] = rewards
    return out


def row_advantages(
    values: np.ndarray, acts: np.ndarray, rewards: np.ndarray, gamma: float, lambda_: float
) -> tuple[np.ndarray, np.ndarray]:
    """GAE advantages and value targets ``[T, B]`` of one terminated episode of one agent.

    ``values`` ``[T, B]``: the value of each row at each of the agent's T steps; ``acts`` ``[T, B]``
    bool: where the agent acted; ``rewards`` ``[T, B]``: the reward each row brought after step t
    (the ``REWARD`` column of observation t + 1). For each sample the acting steps
    ``t_1 < ... < t_m`` form its trajectory: the reward of step ``t_j`` is the sum of ``rewards``
    from ``t_j`` up to ``t_{j+1}`` (excluded), the last step's runs to the episode's end, after
    which the sample is terminated (value 0). Entries where the agent did not act are 0.
    """
    T, B = acts.shape
    adv, targets = np.zeros((T, B)), np.zeros((T, B))
    reward_since = np.zeros(B)  # rewards after t up to the next acting step
    next_value, next_adv = np.zeros(B), np.zeros(B)  # at the next acting step (0: terminal)
    for t in range(T - 1, -1, -1):
        reward_since = reward_since + rewards[t]
        a = acts[t]
        delta = reward_since + gamma * next_value - values[t]
        gae = delta + gamma * lambda_ * next_adv
        adv[t] = np.where(a, gae, 0.0)
        targets[t] = np.where(a, gae + values[t], 0.0)
        next_value = np.where(a, values[t], next_value)
        next_adv = np.where(a, gae, next_adv)
        reward_since = np.where(a, 0.0, reward_since)
    return adv, targets
