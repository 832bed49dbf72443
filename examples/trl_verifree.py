"""VeriFree inside TRL: train the built-in model on the built-in task with
`pyvf.integrations.trl.VeriFreeTrainer` and write the reward curve.

    pip install --no-build-isolation -e ".[trl]"
    python examples/trl_verifree.py --max-steps 40      # CPU: 20-40 s a step on 2 cores (16 samples of 64 tokens)
    python examples/trl_verifree.py --model Qwen/Qwen3-1.7B --data my.jsonl --use-vllm --bf16   # a real run

The dataset is any `datasets.Dataset` with a `prompt` column and an `answer` column (a
reference answer or a list of equivalent ones): here 200 synthetic arithmetic problems,
or a JSONL file of {"prompt": ..., "answer": ...} rows. The trainer is TRL's GRPOTrainer
with no reward function: the reward is the policy's own probability of the reference
answer after its reasoning, from the same forward as the gradient.

Writes OUTPUT_DIR/reward_curve.csv (step, reward, marker_found, loss) and, with
matplotlib, OUTPUT_DIR/reward_curve.png.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def build_dataset(path: str | None, n: int):
    from datasets import Dataset

    if path:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    from pyvf.data.synthetic import generate

    problems = generate(n, seed=0)
    return Dataset.from_dict({"prompt": [p.prompt for p in problems], "answer": [list(p.answers) for p in problems]})


def write_curve(log_history: list[dict], out_dir: Path) -> list[dict]:
    rows = [{"step": h["step"], "reward": h["reward"], "marker_found": h.get("verifree/marker_found"),
             "loss": h.get("loss")} for h in log_history if "reward" in h]
    with open(out_dir / "reward_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "reward", "marker_found", "loss"])
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return rows
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward pi(answer | prompt, reasoning)")
    ax.set_title("VeriFreeTrainer (TRL)")
    fig.tight_layout()
    fig.savefig(out_dir / "reward_curve.png", dpi=120)
    plt.close(fig)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin", help="a local Hugging Face model directory, or 'builtin'")
    parser.add_argument("--data", default=None, help="JSONL with prompt and answer; default: the synthetic task")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--use-vllm", action="store_true", help="generate with vLLM (TRL's colocate mode)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output-dir", default="runs/trl_verifree")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from pyvf.assets import load_tokenizer
    from pyvf.integrations.trl import VeriFreeTrainer
    from pyvf.runtime.model import BUILTIN_MODEL_DIR

    if args.model == "builtin":
        model_path, tokenizer = str(BUILTIN_MODEL_DIR), load_tokenizer()
    else:
        model_path, tokenizer = args.model, AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = GRPOConfig(
        output_dir=str(out_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        use_vllm=args.use_vllm,
        vllm_mode="colocate",
        seed=args.seed,
    )
    trainer = VeriFreeTrainer(model, args=config, train_dataset=build_dataset(args.data, args.num_prompts),
                              processing_class=tokenizer)
    trainer.train()
    rows = write_curve(trainer.state.log_history, out_dir)
    print(f"reward curve ({len(rows)} steps) -> {out_dir / 'reward_curve.csv'}")
    for r in rows:
        print(f"step {r['step']:4d}  reward {r['reward']:.4f}  marker {r['marker_found']:.2f}")


if __name__ == "__main__":
    main()
