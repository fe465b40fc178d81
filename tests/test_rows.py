"""Many samples per agent: per-sample credit assignment is what per-sample agents would get.

The env's agents act on the whole batch; the learner (``RowAdvantages``) must hand PPO exactly the
rows, actions, advantages and value targets that one agent per sample would have produced. Checked
against RLlib's own GAE (``compute_value_targets``) run sample by sample.
"""

import copy

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.postprocessing.value_predictions import compute_value_targets

from rldiff.core.routing import OBS_DIM
from rldiff.rl.rows import ACTS, REWARD, row_advantages


def per_sample_gae(values, rewards, gamma, lambda_):
    """RLlib's GAE over one sample's own trajectory (terminated at its end)."""
    m = len(values)
    done = np.zeros(m)
    done[-1] = 1.0
    targets = compute_value_targets(
        values=np.asarray(values, np.float64),
        rewards=np.asarray(rewards, np.float64),
        terminateds=done,
        truncateds=np.zeros(m),
        gamma=gamma,
        lambda_=lambda_,
    )
    return targets - values, targets


def compressed(acts_i, rewards_i):
    """One sample's acting steps and the reward of each (rewards up to its next acting step)."""
    steps = np.flatnonzero(acts_i)
    if not len(steps):
        return steps, []
    bounds = [*steps[1:], len(acts_i)]
    return steps, [rewards_i[s:e].sum() for s, e in zip(steps, bounds, strict=True)]


@pytest.mark.parametrize("gamma,lambda_", [(1.0, 0.95), (0.9, 0.5)])
def test_row_advantages_equal_rllib_gae_per_sample(gamma, lambda_):
    rng = np.random.default_rng(0)
    T, B = 9, 40
    values = rng.normal(size=(T, B))
    acts = rng.random((T, B)) < 0.5
    acts[rng.integers(0, T, B), np.arange(B)] = True  # every sample acted at least once
    rewards = np.where(rng.random((T, B)) < 0.3, rng.normal(size=(T, B)), 0.0)
    adv, targets = row_advantages(values, acts, rewards, gamma, lambda_)
    assert (adv[~acts] == 0).all() and (targets[~acts] == 0).all()
    for i in range(B):
        steps, r = compressed(acts[:, i], rewards[:, i])
        want_adv, want_targets = per_sample_gae(values[steps, i], r, gamma, lambda_)
        np.testing.assert_allclose(adv[steps, i], want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(targets[steps, i], want_targets, rtol=1e-5, atol=1e-5)


def test_learner_rows_are_the_per_sample_agents_rows(ray_local, tmp_path, tiny_train_config):
    """Sampled episodes through the learner's connector pipeline: for every module, one row per
    (sample, step) it acted on, with that sample's observation, action, log-probability and the
    advantage / value target of RLlib's GAE along that sample's own trajectory."""
    from rldiff.rl.algo import build_config

    cfg = tiny_train_config(str(tmp_path), batch_size=6, gamma=0.97, lambda_=0.9)
    algo = build_config(cfg).build_algo()
    try:
        episodes = algo.env_runner.sample(num_episodes=3, explore=True)
        learner = algo.learner_group._learner
        batch = learner._learner_connector(
            rl_module=learner.module,
            batch={},
            episodes=copy.deepcopy(episodes),
            shared_data={},
            metrics=learner.metrics,
        )
        for module_id, rows in batch.items():
            module = learner.module[module_id]
            want = expected_rows(episodes, module_id, module, algo.config, cfg)
            got = {k: np.asarray(v.detach().cpu()) for k, v in rows.items()}
            assert got[Columns.OBS].shape == (len(want["adv"]), OBS_DIM), module_id
            np.testing.assert_allclose(got[Columns.OBS], want["obs"], atol=1e-7)
            np.testing.assert_allclose(got[Columns.ACTIONS], want["actions"], atol=1e-7)
            np.testing.assert_allclose(got[Columns.ACTION_LOGP], want["logp"], atol=1e-6)
            np.testing.assert_allclose(
                got[Postprocessing.VALUE_TARGETS], want["targets"], rtol=1e-4, atol=1e-5
            )
            np.testing.assert_allclose(
                got[Postprocessing.ADVANTAGES], want["adv"], rtol=1e-4, atol=1e-4
            )
        assert "router" in batch and len(batch) >= 2
        routed = sum(len(batch[m][Columns.OBS]) for m in batch if m != "router")
        assert routed == len(batch["router"][Columns.OBS])  # each routed step: one expert row
    finally:
        algo.stop()


def expected_rows(episodes, module_id, module, algo_config, cfg) -> dict:
    """The rows of ``module_id`` as per-sample agents would give them, in (episode, step, sample)
    order, advantages standardised over the module's rows as RLlib does."""
    keys, obs, actions, logp, adv, targets = [], [], [], [], [], []
    for e, episode in enumerate(episodes):
        for agent_id, sa in episode.agent_episodes.items():
            if algo_config.policy_mapping_fn(agent_id, episode) != module_id:
                continue
            o = np.asarray(sa.get_observations())  # [T + 1, B, ROW_WIDTH]
            a = np.asarray(sa.get_actions())
            lp = np.asarray(sa.get_extra_model_outputs(Columns.ACTION_LOGP))
            features = torch.as_tensor(o[:-1, :, :OBS_DIM])
            with torch.no_grad():
                values = module.compute_values({Columns.OBS: features}).double().numpy()
            acts, rewards = o[:-1, :, ACTS] > 0.5, o[1:, :, REWARD].astype(np.float64)
            for i in range(o.shape[1]):
                steps, r = compressed(acts[:, i], rewards[:, i])
                if not len(steps):
                    continue
                sample_adv, sample_targets = per_sample_gae(
                    values[steps, i], r, cfg.gamma, cfg.lambda_
                )
                for s, ad, tg in zip(steps, sample_adv, sample_targets, strict=True):
                    keys.append((e, s, i))
                    obs.append(o[s, i, :OBS_DIM])
                    actions.append(a[s][i])
                    logp.append(lp[s][i])
                    adv.append(ad)
                    targets.append(tg)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    adv = np.asarray(adv)
    adv = (adv - adv.mean()) / max(1e-4, adv.std())
    pick = lambda xs: np.asarray(xs)[order]  # noqa: E731
    return {
        "obs": pick(obs),
        "actions": pick(actions),
        "logp": pick(logp),
        "adv": adv[order],
        "targets": pick(targets),
    }


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_module_passes_over_its_own_rows_num_epochs_times(shuffle):
    """``ModuleEpochs``: every row of every module is trained on exactly ``num_epochs`` times, in
    minibatches of at most ``minibatch_size`` rows; a small module is not cycled to the size of
    the largest (RLlib's cyclic iterator would give it several times the passes)."""
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    from rldiff.rl.learner import ModuleEpochs

    sizes = {"router": 1000, "expert_0": 730, "expert_3": 90, "expert_5": 1}
    batch = MultiAgentBatch(
        {m: SampleBatch({"row": np.arange(n)}) for m, n in sizes.items()}, env_steps=50
    )
    seen = {m: np.zeros(n, int) for m, n in sizes.items()}
    minibatches = list(ModuleEpochs(batch, num_epochs=3, minibatch_size=256, shuffle=shuffle))
    assert len(minibatches) == 3 * 4  # the router: ceil(1000 / 256) = 4 minibatches per pass
    for minibatch in minibatches:
        for m, rows in minibatch.policy_batches.items():
            assert 0 < len(rows) <= 256
            np.add.at(seen[m], rows["row"], 1)
    for m in sizes:
        assert (seen[m] == 3).all(), m
    assert sum("expert_5" in mb.policy_batches for mb in minibatches) == 3
