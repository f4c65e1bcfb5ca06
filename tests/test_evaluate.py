"""fedslm evaluate: option scoring against hand-computed log-likelihoods, the three tasks
on models whose answers are known in closed form, eval.json, and the errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedslm.data.tokenize import chat_prompt
from fedslm.use.eval_data import EvalSet
from fedslm.use.evaluate import EvalError, evaluate_model
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.use.scoring import macro_f1, option_logprobs


def _tiny(tiny_cfg):
    return load_base_model(resolve_model_dir(tiny_cfg.model))


def test_option_scores_equal_full_sequence_log_likelihoods(tiny_cfg):
    model, tok = _tiny(tiny_cfg)
    model.eval()
    prompt = tok(chat_prompt(tok, "Which intent?"), add_special_tokens=False)["input_ids"]
    options = [tok(o, add_special_tokens=False)["input_ids"] for o in ("card lost", "x", "top up failed")]
    got = option_logprobs(model, prompt, options)
    for score, opt in zip(got, options):
        # by hand: one full forward over prompt + option, sum of the option tokens' log-probs
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + opt])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        want = sum(logp[len(prompt) + j - 1, t].item() for j, t in enumerate(opt))
        assert score.item() == pytest.approx(want, abs=1e-4)
    assert got[0] != got[2]  # padding of the shorter options did not leak into the longer one


def _biased(model, token_id: int, bias: float):
    """A head that ignores the input: logits = bias on one token, 0 elsewhere, so every
    log-likelihood is known in closed form."""
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = bias
    model.lm_head = head
    return model


def test_three_tasks_on_a_model_with_known_answers(tiny_cfg):
    model, tok = _tiny(tiny_cfg)
    y = tok("y", add_special_tokens=False)["input_ids"][0]
    b, vocab = 3.0, model.config.vocab_size
    model = _biased(model, y, b)
    log_z = math.log(math.exp(b) + vocab - 1)
    logp_y, logp_other = b - log_z, -log_z

    # choice: "yy" scores 2*logp_y, "n" scores logp_other, "yn" in between
    examples = [{"prompt": f"question {i}", "answer": a} for i, a in enumerate(["yy", "n", "yy", "yn"])]
    es = EvalSet("fixture", examples, None, golds=[e["answer"] for e in examples], options=["n", "yy", "yn"])
    out = evaluate_model(model, tok, es, "choice", max_length=64)
    assert out["predictions"] == ["yy"] * 4
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["macro_f1"] == pytest.approx((0 + 2 * 2 / (4 + 2) + 0) / 3)
    prompt = tok(chat_prompt(tok, "q"), add_special_tokens=False)["input_ids"]
    scores = option_logprobs(model, prompt, [tok(o, add_special_tokens=False)["input_ids"] for o in ("yy", "n", "yn")])
    assert scores.tolist() == pytest.approx([2 * logp_y, logp_other, logp_y + logp_other], abs=1e-4)

    # perplexity: answers "yy" + eos -> mean token loss (2 * -logp_y - logp_other) / 3
    es_ppl = EvalSet("fixture", [{"prompt": "q", "answer": "yy"}], None)
    ppl = evaluate_model(model, tok, es_ppl, "perplexity", max_length=64)
    want = (-2 * logp_y - logp_other) / 3
    assert ppl["loss"] == pytest.approx(want, abs=1e-4)
    assert ppl["perplexity"] == pytest.approx(math.exp(want), rel=1e-4)
    assert ppl["answer_tokens"] == 3

    # generate: greedy always emits "y"
    gen = evaluate_model(model, tok, EvalSet("fixture", examples[:2], None), "generate", max_length=64, max_new_tokens=2)
    assert gen["predictions"] == ["yy", "yy"]
    assert gen["exact_match"] == pytest.approx(0.5)  # "yy" matches, "n" does not
    assert gen["contains_answer"] == pytest.approx(0.5)


def test_macro_f1_by_hand():
    preds = ["a", "a", "b", "c"]
    golds = ["a", "b", "b", "b"]
    # a: tp 1, 2 predicted, 1 gold -> 2/3; b: tp 1, 1 pred, 3 gold -> 0.5; c: 0
    assert macro_f1(preds, golds) == pytest.approx((2 / 3 + 0.5 + 0) / 3)


def test_choice_needs_labels(tiny_cfg):
    model, tok = _tiny(tiny_cfg)
    with pytest.raises(EvalError, match="needs a label per example"):
        evaluate_model(model, tok, EvalSet("x", [{"prompt": "p", "answer": "a"}], None), "choice", 64)
    with pytest.raises(EvalError, match="unknown task 'bleu'"):
        evaluate_model(model, tok, EvalSet("x", [{"prompt": "p", "answer": "a"}], None), "bleu", 64)


@pytest.fixture
def uniform_model_dir(tiny_cfg, tmp_path):
    """A tiny model with its final norm zeroed: every logit is 0, every token has
    probability 1/V whatever the input."""
    model, tok = _tiny(tiny_cfg)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    out = tmp_path / "uniform"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model.config.vocab_size


def _labelled_file(tmp_path):
    rows = [{"text": f"message {i}", "label": lab} for i, lab in enumerate(["a", "bb", "a", "ccc", "a", "bb"] * 5)]
    path = tmp_path / "intents.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, rows


def test_evaluate_command_writes_eval_json_with_a_baseline(tiny_cfg, uniform_model_dir, tmp_path, capsys):
    from fedslm.cli import main

    model_dir, vocab = uniform_model_dir
    data, rows = _labelled_file(tmp_path)
    base_dir = resolve_model_dir(tiny_cfg.model)
    args = ["evaluate", str(model_dir), "--data", str(data), "--task", "choice", "--split", "all",
            "--set", "data.shape=classification", "--baseline", str(base_dir), "--out", str(tmp_path / "eval.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "accuracy" in printed
    result = json.loads((tmp_path / "eval.json").read_text())
    # uniform model: each option scores -(tokens + eos) * log V, so the shortest ("a") wins
    assert result["predictions"] == ["a"] * len(rows)
    assert result["accuracy"] == pytest.approx(sum(r["label"] == "a" for r in rows) / len(rows))
    assert result["data"]["examples"] == len(rows) and result["baseline"]["task"] == "choice"

    assert main(["evaluate", str(model_dir), "--data", str(data), "--split", "all", "--set",
                 "data.shape=classification", "--out", str(tmp_path / "ppl.json")]) == 0
    ppl = json.loads((tmp_path / "ppl.json").read_text())
    assert ppl["loss"] == pytest.approx(math.log(vocab), abs=1e-4)


def test_evaluate_held_out_split_is_the_federations(tiny_cfg, tmp_path):
    """split=eval gives exactly the rows the sites held out, none they trained on."""
    from fedslm.data.sites import site_rows
    from fedslm.use.eval_data import config_for_data, eval_set

    data, _ = _labelled_file(tmp_path)
    cfg, _ = config_for_data(tmp_path, str(data), ["data.shape=classification", "federation.sites=2",
                                                   "data.eval_fraction=0.2"])
    es = eval_set(cfg, "eval")
    held = [r["text"] for s in range(2) for r in site_rows(cfg.data, s, 2).eval]
    trained = {r["text"] for s in range(2) for r in site_rows(cfg.data, s, 2).train}
    prompts = [e["prompt"].split("\n\n", 1)[1] for e in es.examples]
    assert sorted(prompts) == sorted(held) and not set(prompts) & trained


def test_evaluate_command_errors(tmp_path, uniform_model_dir, capsys):
    from fedslm.cli import main

    model_dir, _ = uniform_model_dir
    assert main(["evaluate", str(tmp_path / "nowhere"), "--data", "banking77"]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert main(["evaluate", str(model_dir), "--data", "banking77", "--task", "bleu"]) == 2
    assert "unknown task 'bleu'; use one of perplexity, choice, generate" in capsys.readouterr().err
    assert main(["evaluate", str(model_dir)]) == 2
    assert "no training_config.json" in capsys.readouterr().err
    assert main(["evaluate", str(model_dir), "--data", "no-such-preset"]) == 2
    assert "neither a data preset" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert main(["evaluate", str(tmp_path / "empty"), "--data", "clinic"]) == 2
    assert "no weights" in capsys.readouterr().err


def test_chat_keeps_the_conversation(tiny_cfg, capsys):
    from fedslm.use.chat import chat

    lines = iter(["Hello", "And then?", "/reset", "New topic"])

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # what input() raises at the end of stdin

    seen = []
    history = chat(resolve_model_dir(tiny_cfg.model), max_new_tokens=4, read=read, write=seen.append,
                   system_prompt="Be brief.")
    # /reset dropped the first two exchanges; end of input ended the chat
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "New topic"

    lines = iter(["Hi", "More"])
    history = chat(resolve_model_dir(tiny_cfg.model), max_new_tokens=4, read=read, write=seen.append)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]


def _by_hand(model, prompt: list[int], option: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + option])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt) + j - 1, t].item() for j, t in enumerate(option))


def _scoring_model(arch: str, seed: int, softcap: float):
    """A tiny random Gemma-2 (soft-capped logits) or a Llama under a PeftModel with
    nonzero LoRA factors, in eval mode."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, final_logit_softcapping=softcap, sliding_window=64,
            attn_implementation="eager")).eval()
    from peft import LoraConfig, get_peft_model

    base = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


@pytest.mark.parametrize("arch", ["gemma2", "llama_lora"])
def test_option_scores_read_only_real_positions_on_other_heads(arch):
    """Scoring projects to the vocabulary only where an option token is predicted: the
    same numbers as the model's own forward for Gemma-2 (its logits are soft-capped) and
    for a PeftModel with trained LoRA factors."""
    model = _scoring_model(arch, seed=0, softcap=2.0)
    prompt, options = [5, 17, 3, 44, 9], [[12, 30, 7, 8], [61], [12, 30], [90, 2, 2]]
    got = option_logprobs(model, prompt, options)
    want = [_by_hand(model, prompt, o) for o in options]
    assert got.tolist() == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("arch", ["gemma2", "llama_lora"])
def test_scorer_reused_across_prompts_matches_the_full_forward_and_its_argmax(arch):
    """One scorer, a shared prompt start in its cache, prompts of different lengths one
    after another: every option's score is the full forward's (options share prefixes,
    one is a prefix of another), and the pruned search picks the same option as the
    argmax over all scores, including on a model sharpened so most prefixes are pruned."""
    from fedslm.use.scoring import OptionScorer

    model = _scoring_model(arch, seed=1, softcap=30.0)
    shared = [5, 17, 3]
    options = [[12, 30, 7, 8], [61, 5], [12, 30], [90, 2], [12, 31, 7], [61, 4, 4, 4, 4], [61, 4, 9]]
    prompts = [shared + [44, 9], shared + [1], shared + [8, 8, 8, 8, 8, 8, 2], shared + [44, 9], shared + [70, 3, 21]]
    picks = []
    for sharpen in (1.0, 40.0):  # 40: peaked next-token distributions, the search's pruning case
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(sharpen)  # tied to the input embeddings on Gemma-2
        scorer = OptionScorer(model, options, shared)
        for prompt in prompts:
            want = [_by_hand(model, prompt, o) for o in options]
            got = scorer.scores(prompt)
            assert got.tolist() == pytest.approx(want, abs=1e-4)
            # wave 1: one prefix per forward; 3: prefixes with everything below them that
            # fits; 32: whole subtrees at once
            found = {scorer.best(prompt, wave=w) for w in (1, 3, 32)}
            assert found == {max(range(len(options)), key=want.__getitem__)}
            picks.append(found.pop())
    assert len(set(picks)) > 1  # the prompts and sharpening do move the answer
    with pytest.raises(ValueError, match="shared prefix"):
        scorer.scores([5, 17, 4, 1])
