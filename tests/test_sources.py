"""Model sources: local folders and hub ids (offline, from a prepared cache), each model's own tokenizer and chat
template, the union of stop ids, and reward scoring in the reward model's own template."""

import numpy as np
import pytest
import torch
from hub_cache import add_model
from tiny_llama3 import END_OF_TEXT, EOT, save_policy, save_reward_model

from mtjax.sources import ModelSource, SourceError, describe, load


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama3")
    return save_policy(root / "policy"), save_reward_model(root / "reward")


def test_stop_ids_are_the_union_of_config_generation_config_and_tokenizer(folders):
    spec = describe(ModelSource(source=str(folders[0])), {}, "policy")
    assert spec.stop_ids == (END_OF_TEXT, EOT)
    assert spec.stop_origins == (f"{END_OF_TEXT} (config.json+generation_config.json+tokenizer), "
                                 f"{EOT} (generation_config.json)")
    assert spec.config.eos_token_ids == (END_OF_TEXT, EOT)


def test_a_damaged_generation_config_is_one_error_naming_the_file(folders, tmp_path):
    import shutil

    folder = shutil.copytree(folders[0], tmp_path / "policy")
    (folder / "generation_config.json").write_text('{"eos_token_id": [128001,\n')
    with pytest.raises(SourceError, match=r"generation_config.json: line 2: not valid JSON"):
        describe(ModelSource(source=str(folder)), {}, "policy")

def test_the_policy_stops_on_eot_that_only_the_generation_config_names(folders):
    from mtjax import data
    from mtjax.sampling import generate

    spec = describe(ModelSource(source=str(folders[0])), {}, "policy")
    model, params = load(spec, "causal_lm", run_seed=0)
    prompts = [data.chat_prompt_ids(spec.tokenizer, f"write a short story about {w}") for w in ("water", "light")]
    kwargs = dict(max_new_tokens=40, temperature=0.8, num_samples=6, pad_token_id=spec.pad_id, seed=3)
    out = [g for per in generate(model, params, prompts, eos_token_ids=spec.stop_ids, **kwargs) for g in per]
    stopped = [g for g in out if g.finish_reason == "stop"]
    assert len(stopped) >= len(out) // 2
    assert all(g.token_ids[-1] == EOT for g in stopped)
    assert not any(END_OF_TEXT in g.token_ids for g in out)
    # With config.json's EOS alone (the pitfall) no response would ever stop.
    only_config = generate(model, params, prompts, eos_token_ids=[END_OF_TEXT], **kwargs)
    assert all(g.finish_reason == "length" for per in only_config for g in per)


def test_hub_ids_resolve_offline_from_the_cache_and_name_the_local_alternative(folders, tmp_path, monkeypatch):
    import huggingface_hub.constants

    add_model(tmp_path, "meta-llama/Meta-Llama-3-8B-Instruct", folders[0])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = describe(ModelSource(source="meta-llama/Meta-Llama-3-8B-Instruct"), {"dtype": "bfloat16"}, "policy")
    assert spec.folder.is_relative_to(tmp_path / "hub") and spec.stop_ids == (END_OF_TEXT, EOT)
    assert spec.config.dtype == "bfloat16" and spec.config.num_layers == 2
    model, params = load(spec, "causal_lm", run_seed=0)
    assert model.cfg.dtype == "bfloat16" and params["model"]["embed_tokens"]["embedding"].shape[0] == 128256
    with pytest.raises(SourceError, match=r"reward_model.source='org/not-cached': cannot get its config and "
                                          r"tokenizer from the hub \(HF_HUB_OFFLINE is set.*"
                                          r"--config.reward_model.source=/path/to/folder"):
        describe(ModelSource(source="org/not-cached"), {}, "reward_model")
    with pytest.raises(SourceError, match=r"neither 'smollm2' nor 'tiny' nor 'synthetic', an existing folder, "
                                          r"nor a hub repo id"):
        describe(ModelSource(source="./no/such/folder"), {}, "policy")


def test_a_tokenizer_without_chat_template_is_refused(folders, tmp_path):
    import shutil

    broken = tmp_path / "no_template"
    shutil.copytree(folders[0], broken)
    (broken / "chat_template.jinja").unlink(missing_ok=True)
    config = (broken / "tokenizer_config.json")
    import json

    tok_cfg = json.loads(config.read_text())
    tok_cfg.pop("chat_template", None)
    config.write_text(json.dumps(tok_cfg))
    with pytest.raises(SourceError, match="has no chat template"):
        describe(ModelSource(source=str(broken)), {}, "policy")


def test_reward_scoring_re_renders_responses_in_the_reward_models_own_template(folders):
    """Policy and RM templates differ: the RM scores the decoded response in its own template, exactly what
    transformers' LlamaForSequenceClassification gives on that conversation."""
    from types import SimpleNamespace

    from transformers import AutoModelForSequenceClassification

    from mtjax import data
    from mtjax.sampling import SamplingConfig
    from mtjax.scoring import RewardScorer, conversation_ids

    policy = describe(ModelSource(source=str(folders[0])), {}, "policy")
    reward = describe(ModelSource(source=str(folders[1])), {}, "reward_model")
    rm, rm_params = load(reward, "reward", run_seed=0)
    models = SimpleNamespace(reward=rm, tokenizer=policy.tokenizer, reward_tokenizer=reward.tokenizer,
                             stop_ids=policy.stop_ids, reward_pad_id=reward.pad_id)
    scorer = RewardScorer(models, SamplingConfig(batch_size=4))
    assert not scorer.reuses_ids
    prompts = ["write a poem about water", [{"role": "system", "content": "be short"},
                                            {"role": "user", "content": "explain energy"}]]
    responses = ["the light of the world .", "energy is what you make"]
    prompt_ids = [data.chat_prompt_ids(policy.tokenizer, p) for p in prompts]
    response_ids = [data.response_ids(policy.tokenizer, r, EOT) for r in responses]
    ours = scorer.score_ids(rm_params, prompts, prompt_ids, response_ids, progress=False)
    hf = AutoModelForSequenceClassification.from_pretrained(folders[1]).eval()
    for prompt, response, mine in zip(prompts, responses, ours, strict=True):
        ids = conversation_ids(reward.tokenizer, prompt, response)
        assert ids[0] == 128000 and ids.count(128000) == 1  # one BOS, from the template
        assert "USER" in reward.tokenizer.decode(ids) or "<unk>" in reward.tokenizer.decode(ids)
        with torch.no_grad():
            expected = hf(input_ids=torch.tensor([ids])).logits[0, 0].item()
        np.testing.assert_allclose(mine, expected, rtol=1e-4, atol=1e-4)
    texts = scorer.score_texts(rm_params, prompts, responses, progress=False)
    np.testing.assert_allclose(texts, ours, rtol=1e-6)
