"""pyvf inside TRL: VeriFreeTrainer, RLPRTrainer, patch_per_token_logps.

Runs where TRL is installed: the TRL virtual environment that `bash .ci/trl.sh` builds
(trl 1.16.0, the `pyvf[trl]` pin). The GRPOTrainer internals these tests lean on are
trl/trainer/grpo_trainer.py (`_get_per_token_logps_and_entropies`, `_compute_loss`,
`_generate_and_score_completions`) and trl/trainer/utils.py (`add_fused_lm_head`).
"""

import copy
import importlib
import math
import pickle
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed in this environment; bash .ci/trl.sh runs these "
                                        "tests in a virtual environment with the pinned TRL")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from trl import GRPOConfig  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from pyvf.assets import load_tokenizer  # noqa: E402
from pyvf.data.synthetic import generate  # noqa: E402
from pyvf.integrations.trl import (TESTED_TRL_VERSION, RLPRTrainer, VeriFreeTrainer,  # noqa: E402
                                   patch_per_token_logps)
from pyvf.losses import verifree_loss  # noqa: E402
from pyvf.packing import ROLE_ANSWER, Sequence, pack  # noqa: E402
from pyvf.rewards import rlpr_rewards, rlpr_score  # noqa: E402
from pyvf.splice import splice_reference  # noqa: E402
from pyvf.runtime.model import BUILTIN_MODEL_DIR  # noqa: E402
from pyvf.runtime.policy import Policy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def rel_err(out, ref):
    # tests/numerics.py has the same; it is not imported because .ci/trl.sh runs this folder with
    # --confcutdir (tests/ must stay off sys.path there: a tests/vllm folder would shadow the vllm package).
    out, ref = out.double().cpu(), ref.double().cpu()
    diff, scale = (out - ref).norm().item(), ref.norm().item()
    return diff / scale if scale > 0 else diff


def test_trl_is_the_tested_version():
    assert trl.__version__ == TESTED_TRL_VERSION


def tiny_model(seed=0, vocab=97):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen3ForCausalLM(cfg).float()


def shipped_model():
    return AutoModelForCausalLM.from_pretrained(str(BUILTIN_MODEL_DIR), dtype=torch.float32)


def problems_dataset(n=16):
    probs = generate(n, seed=0)
    return Dataset.from_dict({"prompt": [p.prompt for p in probs], "answer": [list(p.answers) for p in probs]}), probs


def grpo_args(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                num_generations=2, max_completion_length=32, max_steps=2, logging_steps=1, report_to="none",
                learning_rate=1e-4, use_cpu=True, bf16=False, save_strategy="no", seed=0)
    base.update(overrides)
    return GRPOConfig(**base)


# --- package layout -------------------------------------------------------------------

# Run in a fresh interpreter: this module has imported TRL and the trainers already.
LAZY_IMPORT = """
import sys
from pyvf.integrations.trl import TESTED_TRL_VERSION, FusedLogprobsOutput, patch_per_token_logps
assert "trl" not in sys.modules, "importing pyvf.integrations.trl imported trl"
import pyvf.integrations.trl as pkg
cls = pkg.VeriFreeTrainer
from pyvf.integrations.trl.verifree import VeriFreeTrainer
assert "trl" in sys.modules and cls is VeriFreeTrainer
"""

# sys.modules["trl"] = None makes `import trl` raise ImportError, as when TRL is not installed.
WITHOUT_TRL = """
import sys
sys.modules["trl"] = None
import pyvf.integrations.trl as pkg
for name in ("VeriFreeTrainer", "RLPRTrainer"):
    try:
        getattr(pkg, name)
    except ImportError as exc:
        assert "pip install 'pyvf[trl]'" in str(exc), exc
    else:
        raise AssertionError(f"{name} imported without trl")
"""


@pytest.mark.parametrize("script", [LAZY_IMPORT, WITHOUT_TRL], ids=["lazy-import", "without-trl"])
def test_package_imports_trl_only_for_a_trainer(script):
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name, module", [("VeriFreeTrainer", "verifree"), ("RLPRTrainer", "rlpr")])
def test_trainers_are_module_level_classes(name, module):
    import pyvf.integrations.trl as pkg

    cls = getattr(importlib.import_module(f"pyvf.integrations.trl.{module}"), name)
    assert cls is getattr(pkg, name)
    assert cls.__qualname__ == name and cls.__module__ == f"pyvf.integrations.trl.{module}"
    assert issubclass(cls, trl.GRPOTrainer)
    assert pickle.loads(pickle.dumps(cls)) is cls  # found again by its module and name


# --- patch_per_token_logps ----------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_patched_head_equals_trl_head(temperature):
    theirs = tiny_model()
    ours = copy.deepcopy(theirs)
    add_fused_lm_head(theirs, temperature=temperature, outputs=("log_probs", "entropy"))
    add_fused_lm_head(ours, temperature=temperature, outputs=("log_probs", "entropy"))
    patch_per_token_logps(ours, temperature=temperature)
    input_ids = torch.randint(3, 97, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 8:] = 0  # a right-padded row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    w = torch.randn(3, 10)
    u = torch.randn(3, 10)
    results = []
    for model in (theirs, ours):
        model.zero_grad()
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        ((out.log_probs * w).sum() + (out.entropy * u).sum()).backward()
        results.append((out.log_probs.detach(), out.entropy.detach(), out.loss.detach(),
                        model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    for mine, ref in zip(results[1], results[0]):
        assert rel_err(mine, ref) < 1e-5
    assert (results[1][0][labels[:, 1:] == -100] == 0).all()


def test_patch_keeps_generation_and_plain_forward():
    model = tiny_model()
    plain = copy.deepcopy(model)
    patch_per_token_logps(model)
    ids = torch.randint(3, 97, (2, 6))
    assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, plain.generate(ids, max_new_tokens=3, do_sample=False))


def test_patch_rejects_softcapped_logits_and_fields_it_does_not_compute():
    model = tiny_model()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-caps"):
        patch_per_token_logps(model)
    with pytest.raises(ValueError, match="trainer_or_model"):
        patch_per_token_logps(object())
    model = tiny_model()
    patch_per_token_logps(model)
    ids = torch.randint(3, 97, (1, 5))
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    with pytest.raises(NotImplementedError, match="mean_logits"):
        out.mean_logits


@pytest.fixture(scope="module")
def grpo_trainer(tmp_path_factory):
    ds, _ = problems_dataset(8)

    def length_reward(completions, **_):
        return [float(len(c)) for c in completions]

    args = grpo_args(tmp_path_factory.mktemp("grpo"), temperature=0.9)
    return trl.GRPOTrainer(shipped_model(), reward_funcs=length_reward, args=args, train_dataset=ds,
                           processing_class=load_tokenizer())


def test_patch_grpo_trainer_logps_and_entropies(grpo_trainer):
    tok = grpo_trainer.processing_class
    prompts = tok(["Question: Ada has 3 apples.", "Question: Ben"], padding=True, padding_side="left",
                  return_tensors="pt")
    completion = torch.randint(3, len(tok), (2, 7))
    input_ids = torch.cat([prompts.input_ids, completion], 1)
    mask = torch.cat([prompts.attention_mask, torch.ones_like(completion)], 1)
    mask[1, -2:] = 0

    def run():
        grpo_trainer.model.zero_grad()
        logps, ent, _ = grpo_trainer._get_per_token_logps_and_entropies(grpo_trainer.model, input_ids, mask, 7,
                                                                       compute_entropy=True)
        (logps.sum() + 0.3 * ent.sum()).backward()
        return logps.detach(), ent.detach(), grpo_trainer.model.lm_head.weight.grad.clone()

    theirs = run()
    patch_per_token_logps(grpo_trainer)
    assert grpo_trainer.model._pyvf_token_logprobs
    ours = run()
    for mine, ref in zip(ours, theirs):
        assert rel_err(mine, ref) < 1e-5


# --- VeriFreeTrainer ------------------------------------------------------------------

@pytest.fixture(scope="module")
def verifree(tmp_path_factory):
    ds, probs = problems_dataset(16)
    # log_completions checks that the completions table (prompts, rewards, advantages) lines up.
    trainer = VeriFreeTrainer(shipped_model(), args=grpo_args(tmp_path_factory.mktemp("vf"), log_completions=True),
                              train_dataset=ds, processing_class=load_tokenizer())
    return trainer, probs


def test_verifree_trains_two_steps(verifree):
    trainer, _ = verifree
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    logged = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logged) == 2
    for h in logged:
        assert 0.0 <= h["reward"] <= 1.0 and math.isfinite(h["loss"])
        assert 0.0 <= h["verifree/marker_found"] <= 1.0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def _fixed_completions(tok, probs):
    """Two groups of two: (correct reasoning, shortcut reasoning), (correct reasoning, no marker)."""
    eos = tok.eos_token_id

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    p0, p1 = probs[0], probs[1]
    completions = [enc(p0.completion) + [eos], enc(p0.shortcut_completion) + [eos],
                   enc(p1.completion) + [eos], enc(" " + p1.solution) + [eos]]
    prompts = [enc(p0.prompt)] * 2 + [enc(p1.prompt)] * 2
    refs = [list(p0.answers)] * 2 + [list(p1.answers)] * 2
    return prompts, completions, refs


def test_verifree_loss_equals_pyvf_verifree_loss(verifree):
    trainer, probs = verifree
    tok = trainer.processing_class
    prompts, completions, refs = _fixed_completions(tok, probs)
    inputs = trainer._splice(prompts, completions, refs, torch.device("cpu"))
    inputs["group"] = torch.tensor([0, 0, 1, 1])
    trainer.model.eval()  # no gradient-accumulation scaling of the loss
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grad = trainer.model.get_output_embeddings().weight.grad.clone()
    trainer_rewards = torch.tensor(list(trainer._logs["rewards"]["verifree"])[-4:])

    # The same batch built from pyvf's own parts.
    seqs, completion, weights = [], [], []
    for i, (p, c, r) in enumerate(zip(prompts, completions, refs)):
        spliced = splice_reference(tok, c, r)
        if not spliced[0].found:
            seqs.append(Sequence(p, spliced[0].reasoning_ids, [], group=i // 2))
            completion.append(i)
            weights.append(1.0)
            continue
        for sp in spliced:
            seqs.append(Sequence(p, sp.reasoning_ids, sp.answer_ids, group=i // 2))
            completion.append(i)
            weights.append(1.0 / len(spliced))
    batch = pack(seqs)
    trainer.model.zero_grad()
    logp = Policy(trainer.model)(batch)
    ref = verifree_loss(logp, batch.roles, batch.cu_seqlens, batch.groups, completion=torch.tensor(completion),
                        weights=torch.tensor(weights))
    ref.loss.backward()
    ref_grad = trainer.model.get_output_embeddings().weight.grad.clone()
    trainer.model.train()

    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * max(1.0, abs(ref.loss.item()))
    assert rel_err(grad, ref_grad) < 1e-5
    assert torch.allclose(trainer_rewards, ref.rewards.float(), rtol=1e-5, atol=1e-7)
    assert ref.rewards[0] > 0 and ref.rewards[2] > 0


def test_verifree_reward_zero_without_marker(verifree):
    trainer, probs = verifree
    tok = trainer.processing_class
    prompts, completions, refs = _fixed_completions(tok, probs)
    # A completion with the marker but cut by the length limit before the answer closed.
    truncated = tok(" " + probs[1].solution + " <answer> \\boxed{", add_special_tokens=False)["input_ids"]
    completions[2] = truncated
    inputs = trainer._splice(prompts, completions, refs, torch.device("cpu"))
    assert inputs["found"].tolist() == [True, True, False, False]
    inputs["group"] = torch.tensor([0, 0, 1, 1])
    trainer.model.eval()
    with torch.no_grad():
        trainer._compute_loss(trainer.model, inputs)
    trainer.model.train()
    rewards = list(trainer._logs["rewards"]["verifree"])[-4:]
    assert rewards[2] == 0.0 and rewards[3] == 0.0
    assert rewards[0] > 0.0


def test_verifree_rejects_what_does_not_apply(tmp_path):
    ds, _ = problems_dataset(4)
    tok = load_tokenizer()
    model = tiny_model(vocab=len(tok))
    with pytest.raises(ValueError, match="reward_funcs"):
        VeriFreeTrainer(model, args=grpo_args(tmp_path), train_dataset=ds, processing_class=tok,
                        reward_funcs=[lambda **_: [0.0]])
    with pytest.raises(ValueError, match="multiple of num_generations"):
        VeriFreeTrainer(model, args=grpo_args(tmp_path, per_device_train_batch_size=3, num_generations=2,
                                              generation_batch_size=6), train_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match="beta"):
        VeriFreeTrainer(model, args=grpo_args(tmp_path, beta=0.1), train_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match="'answer' column"):
        VeriFreeTrainer(model, args=grpo_args(tmp_path), train_dataset=ds.remove_columns("answer"),
                        processing_class=tok)


def test_verifree_subclass_from_its_module(tmp_path):
    from pyvf.integrations.trl.verifree import VeriFreeTrainer as FromModule

    class CountingTrainer(FromModule):
        """Counts the splices: a hook a user subclass overrides."""

        def _splice(self, *args, **kwargs):
            self.splices = getattr(self, "splices", 0) + 1
            return super()._splice(*args, **kwargs)

    ds, probs = problems_dataset(4)
    tok = load_tokenizer()
    trainer = CountingTrainer(tiny_model(vocab=len(tok)), args=grpo_args(tmp_path), train_dataset=ds,
                              processing_class=tok)
    assert isinstance(trainer, VeriFreeTrainer) and trainer.model._pyvf_token_logprobs
    prompts, completions, refs = _fixed_completions(tok, probs)
    inputs = trainer._splice(prompts, completions, refs, torch.device("cpu"))
    assert trainer.splices == 1 and inputs["found"].tolist() == [True, True, True, False]


# --- RLPRTrainer ----------------------------------------------------------------------

def test_rlpr_rewards_match_pyvf_formulas(tmp_path):
    ds, probs = problems_dataset(4)
    trainer = RLPRTrainer(shipped_model(), args=grpo_args(tmp_path), train_dataset=ds,
                          processing_class=load_tokenizer(), std_filter=False)
    tok = trainer.processing_class
    assert trainer.score_training_prompts() == sum(len(p.answers) for p in probs)
    _, completions, _ = _fixed_completions(tok, probs)
    inputs = [ds[0], ds[0], ds[1], ds[1]]
    got = trainer._calculate_rewards(inputs, [x["prompt"] for x in inputs], None, completions)[:, 0]

    policy = Policy(trainer.model)
    expected = []
    for x, c in zip(inputs, completions):
        p_ids = tok(x["prompt"], add_special_tokens=False)["input_ids"]
        spliced = splice_reference(tok, c, x["answer"])
        if not spliced[0].found:
            expected.append(0.0)
            continue
        total = 0.0
        for sp in spliced:
            scores = []
            for reasoning in (sp.reasoning_ids, []):
                batch = pack([Sequence(p_ids, reasoning, sp.answer_ids, group=0)])
                with torch.no_grad():
                    logp = policy(batch)
                span = torch.zeros_like(batch.roles, dtype=torch.bool)
                rows = (batch.roles == ROLE_ANSWER).nonzero().squeeze(1)
                span[rows[sp.reference_span]] = True
                scores.append(rlpr_score(logp, span, batch.cu_seqlens).double())
            total += float(rlpr_rewards(scores[0], scores[1], torch.ones(1, dtype=torch.float64))) / len(spliced)
        expected.append(total)
    assert got[3].item() == 0.0
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert got[0].item() >= 0.1


def test_verifree_trains_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (bash .ci/trl.sh installs it)")
    ds, _ = problems_dataset(8)
    trainer = VeriFreeTrainer(shipped_model(), args=grpo_args(tmp_path, max_steps=1, max_completion_length=40,
                                                             learning_rate=1e-3),
                              train_dataset=ds, processing_class=load_tokenizer(),
                              peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora_b
    trainer.train()
    # B starts at zero, so the first step moves B only (the gradient of A is proportional to B);
    # 40 tokens let the built-in model reach the marker, so the rewards are not all 0.
    assert all(not torch.equal(p, lora_b[n]) for n, p in trainer.model.named_parameters() if n in lora_b)


def test_verifree_logprob_form_scores_every_completion(tmp_path):
    """reward_form="logprob": a completion without the marker gets the reference too, and
    the trainer's loss and gradient are pyvf's verifree_loss in that form."""
    from pyvf.verify.verifree import splice_answers

    ds, probs = problems_dataset(8)
    trainer = VeriFreeTrainer(shipped_model(), args=grpo_args(tmp_path), train_dataset=ds,
                              processing_class=load_tokenizer(), reward_form="logprob")
    tok = trainer.processing_class
    prompts, completions, refs = _fixed_completions(tok, probs)
    inputs = trainer._splice(prompts, completions, refs, torch.device("cpu"))
    assert inputs["found"].tolist() == [True, True, True, True]
    inputs["group"] = torch.tensor([0, 0, 1, 1])
    trainer.model.eval()
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grad = trainer.model.get_output_embeddings().weight.grad.clone()

    seqs, completion, weights = [], [], []
    for i, (p, c, r) in enumerate(zip(prompts, completions, refs)):
        spliced, _ = splice_answers(tok, c, r, marker=trainer.marker, answer_template=trainer.answer_template,
                                    every=True)
        for sp in spliced:
            seqs.append(Sequence(p, sp.reasoning_ids, sp.answer_ids, group=i // 2))
            completion.append(i)
            weights.append(1.0 / len(spliced))
    batch = pack(seqs)
    trainer.model.zero_grad()
    logp = Policy(trainer.model)(batch)
    ref = verifree_loss(logp, batch.roles, batch.cu_seqlens, batch.groups, completion=torch.tensor(completion),
                        weights=torch.tensor(weights), reward_form="logprob")
    ref.loss.backward()
    ref_grad = trainer.model.get_output_embeddings().weight.grad.clone()
    trainer.model.train()
    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * max(1.0, abs(ref.loss.item()))
    assert rel_err(grad, ref_grad) < 1e-5
    assert bool((ref.rewards < 0).all())  # log-probabilities, the no-marker completion's included
