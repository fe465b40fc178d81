"""PPO's learner for agents that act on many samples at once: per-row GAE, then one row per
(sample, step).

``RowPPOLearner`` is RLlib's torch PPO learner with its GAE connector piece swapped for
``RowAdvantages``. That piece receives each module's batch with one entry per agent step
(observations ``[B, ROW_WIDTH]``, actions and log-probabilities ``[B, ...]``; RLlib's
``AddOneTsToEpisodesAndTruncate`` appended each episode's final observation, marked by
``LOSS_MASK`` False), computes the values and GAE per sample (``rldiff.rl.rows.row_advantages``),
then replaces the module's batch by the rows where the agent acted: one PPO row per (sample, step),
with the sample's own advantage and value target, standardised over the module's rows as RLlib
standardises per agent step. From there RLlib's PPO loss runs unchanged, on the same rows a
per-sample agent layout would give, in minibatches of ``MINIBATCH_ROWS`` rows per module where
each module passes over its own rows ``num_epochs`` times (``ModuleEpochs``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner.general_advantage_estimation import GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.policy.sample_batch import MultiAgentBatch
from ray.rllib.utils.minibatch_utils import MiniBatchCyclicIterator

from rldiff.core.routing import OBS_DIM
from rldiff.rl.rows import ACTS, REWARD, row_advantages

# The per-row columns the PPO loss reads (besides advantages and value targets).
MINIBATCH_ROWS = "minibatch_rows"  # learner_config_dict key: rows of a module per SGD minibatch
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
        wide = obs.double().cpu().numpy()
        ends = np.flatnonzero(~np.asarray(data[Columns.LOSS_MASK].cpu(), dtype=bool))
        acts = wide[..., ACTS] > 0.5  # [N, B]
        acts[ends] = False  # the appended final observations are not steps
        if not acts.any():
            return None
        select = torch.as_tensor(acts, device=obs.device)
        values = np.zeros(acts.shape)  # read only where the agent acted: computed only there
        with torch.no_grad():
            values[acts] = module.compute_values({Columns.OBS: obs[select]}).double().cpu().numpy()
        adv, targets = np.zeros(values.shape), np.zeros(values.shape)
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
        adv = adv[acts]
        adv = (adv - adv.mean()) / max(1e-4, adv.std())
        rows = {Columns.OBS: obs[select][:, :OBS_DIM]}
        rows.update({column: data[column][select] for column in ROW_COLUMNS})
        as_tensor = {"dtype": torch.float32, "device": obs.device}
        rows[Postprocessing.ADVANTAGES] = torch.as_tensor(adv, **as_tensor)
        rows[Postprocessing.VALUE_TARGETS] = torch.as_tensor(targets[acts], **as_tensor)
        return rows


class ModuleEpochs:
    """Minibatches in which every module passes over its own rows ``num_epochs`` times, in
    ``ceil(rows / minibatch_size)`` equal minibatches per pass (reshuffled each pass); a module
    whose passes are done sits out the remaining minibatches.

    RLlib's ``MiniBatchCyclicIterator`` instead runs every module until the one with the most rows
    has had its passes, cycling the others' rows: an expert picked for a tenth of the router's rows
    got ten times the router's passes over them, and the learner most of its time."""

    def __init__(self, batch: MultiAgentBatch, num_epochs: int, minibatch_size: int, shuffle=True):
        self.batch, self.num_epochs, self.shuffle = batch, num_epochs, shuffle
        self.splits = {
            m: max(1, math.ceil(len(rows) / minibatch_size))
            for m, rows in batch.policy_batches.items()
        }

    def __iter__(self):
        steps = self.num_epochs * max(self.splits.values(), default=0)
        for step in range(steps):
            minibatch = {}
            for m, rows in self.batch.policy_batches.items():
                k = self.splits[m]
                if step >= k * self.num_epochs:
                    continue
                part = step % k
                if part == 0 and self.shuffle:
                    rows.shuffle()
                minibatch[m] = rows[part * len(rows) // k : (part + 1) * len(rows) // k]
            yield MultiAgentBatch(minibatch, self.batch.env_steps())


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

    def _create_iterator_if_necessary(self, *, num_epochs=1, minibatch_size=None, **kwargs):
        iterator = super()._create_iterator_if_necessary(
            num_epochs=num_epochs, minibatch_size=minibatch_size, **kwargs
        )
        if isinstance(iterator, MiniBatchCyclicIterator) and minibatch_size:
            shuffle = kwargs.get("shuffle_batch_per_epoch", False) and num_epochs > 1
            return ModuleEpochs(iterator._batch, num_epochs, minibatch_size, shuffle)
        return iterator

    def compute_gradients(self, loss_per_module, **kwargs):
        """RLlib's, without the entries of modules that sat out this minibatch (no gradient)."""
        gradients = super().compute_gradients(loss_per_module, **kwargs)
        return {pid: grad for pid, grad in gradients.items() if grad is not None}

    def update(self, *args, minibatch_size=None, **kwargs):
        """PPO's update, minibatches of ``learner_config_dict[MINIBATCH_ROWS]`` rows per module."""
        rows = self.config.learner_config_dict.get(MINIBATCH_ROWS, minibatch_size)
        return super().update(*args, minibatch_size=rows, **kwargs)

    def build(self) -> None:
        super().build()
        pipeline = self._learner_connector
        if pipeline is not None:
            before = len(pipeline)
            pipeline.remove(GeneralAdvantageEstimation)
            if len(pipeline) != before - 1:
                raise RuntimeError(f"no GeneralAdvantageEstimation to replace in {pipeline}")
            pipeline.append(RowAdvantages(gamma=self.config.gamma, lambda_=self.config.lambda_))
