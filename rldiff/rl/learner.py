"""PPO's learner for agents that act on many samples at once: per-row GAE, then one row per
(sample, step).

``RowPPOLearner`` is RLlib's torch PPO learner with its GAE connector piece swapped for
``RowAdvantages``. That piece receives each module's batch with one entry per agent step
(observations ``[B, ROW_WIDTH]``, actions and log-probabilities ``[B, ...]``; RLlib's
``AddOneTsToEpisodesAndTruncate`` appended each episode's final observation, marked by
``LOSS_MASK`` False), computes the values and GAE per sample (``rldiff.rl.rows.row_advantages``),
then replaces the module's batch by the rows where the agent acted: one PPO row per (sample, step),
with the sample's own advantage and value target, standardised over the module's rows as RLlib
standardises per agent step. From there RLlib's PPO loss, minibatches and epochs run unchanged, on
the same rows a per-sample agent layout would give.
"""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner.general_advantage_estimation import GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing

from rldiff.core.routing import OBS_DIM
from rldiff.rl.rows import ACTS, REWARD, row_advantages

# The per-row columns the PPO loss reads (besides advantages and value targets).
ROW_COLUMNS = (Columns.ACTIONS, Columns.ACTION_LOGP, Columns.ACTION_DIST_INPUTS)


class RowAdvantages(ConnectorV2):
    """Learner connector piece: per-row GAE, then the module batches as rows (module docstring)."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, gamma, lambda_):
        super().__init__(input_observation_space, input_action_space)
        self.gamma, self.lambda_ = gamma, lambda_

    def __call__(self, *, rl_module, episodes, batch, **kwargs):
        for module_id in list(batch):
            rows = self._rows(rl_module[module_id], batch[module_id])
            if rows is None:  # the agent acted on no sample: nothing to learn from
                del batch[module_id]
            else:
                batch[module_id] = rows
        return batch

    def _rows(self, module, data: dict) -> dict | None:
        obs = data[Columns.OBS]
        with torch.no_grad():
            values = module.compute_values(data).double().cpu().numpy()  # [N, B]
        wide = obs.double().cpu().numpy()
        ends = np.flatnonzero(~np.asarray(data[Columns.LOSS_MASK].cpu(), dtype=bool))
        adv, targets = np.zeros(values.shape), np.zeros(values.shape)
        acts = wide[..., ACTS] > 0.5
        acts[ends] = False  # the appended final observations are not steps
        start = 0
        for end in ends:  # one episode of this module's agent: steps start .. end - 1
            steps = slice(start, end)
            adv[steps], targets[steps] = row_advantages(
                values[steps],
                acts[steps],
                wide[start + 1 : end + 1, :, REWARD],
                self.gamma,
                self.lambda_,
            )
            start = end + 1
        if not acts.any():
            return None
        adv = adv[acts]
        adv = (adv - adv.mean()) / max(1e-4, adv.std())
        select = torch.as_tensor(acts, device=obs.device)
        rows = {Columns.OBS: obs[select][:, :OBS_DIM]}
        rows.update({column: data[column][select] for column in ROW_COLUMNS})
        as_tensor = {"dtype": torch.float32, "device": obs.device}
        rows[Postprocessing.ADVANTAGES] = torch.as_tensor(adv, **as_tensor)
        rows[Postprocessing.VALUE_TARGETS] = torch.as_tensor(targets[acts], **as_tensor)
        return rows


class RowPPOLearner(PPOTorchLearner):
    """RLlib's torch PPO learner, GAE per sample row (``RowAdvantages``), and Adam's multi-tensor
    (``foreach``) update, the same arithmetic in fewer kernel calls per SGD step."""

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        params = self.get_parameters(self._module[module_id])
        self.register_optimizer(
            module_id=module_id,
            optimizer=torch.optim.Adam(params, foreach=True),
            params=params,
            lr_or_lr_schedule=config.lr,
        )

    def build(self) -> None:
        super().build()
        pipeline = self._learner_connector
        if pipeline is not None:
            before = len(pipeline)
            pipeline.remove(GeneralAdvantageEstimation)
            if len(pipeline) != before - 1:
                raise RuntimeError(f"no GeneralAdvantageEstimation to replace in {pipeline}")
            pipeline.append(RowAdvantages(gamma=self.config.gamma, lambda_=self.config.lambda_))
