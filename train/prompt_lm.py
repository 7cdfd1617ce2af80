"""Train the creative preset's prompt model (models/prompt_lm.py), a small causal LM, on captions alone.

Paper: Radford et al. 2019, GPT-2 (a left-to-right LM, Eq. 1 of Sec. 2); the blocks are DALL-E's
(Ramesh et al. 2021, arXiv 2102.12092; models/dalle.py).

    python -m train.prompt_lm --config configs/shapes/prompt_lm.yaml
    python -m sample --pipeline ldm --preset creative --prompt-lm runs/prompt_lm/ckpt.pt --prompt "a red circle"

The shapes captions come from data/shapes.py's scene sampler without rendering a pixel (as train/text_lm.py);
other datasets (data.dataset=folder:... / hub:...) are loaded and only their captions kept. The BPE tokenizer is
trained on the captions (or taken from the checkpoint when resuming). Loss per step: the cross-entropy of each
next token over the real tokens (padding ignored; models/prompt_lm.py PromptLM.loss).

Writes into train.out_dir (default runs/<config name>): ckpt.pt (kind "prompt_lm": config, weights, optimizer,
RNG states, tokenizer), config.yaml, tensorboard events (loss, lr, gradient norm; sampled captions as text) and
ends with the perplexity per token on fresh captions of another seed, held-in and held-out splits (shapes only),
and captions sampled from the prefixes train.sample_prompts at temperatures 0.7, 1.0 and 1.5 (also written to
out_dir/samples.txt):
    perplexity per token on 2000 fresh captions (seed 1): heldin 2.80 | heldout 3.8
    perplexity floor of the held-in captions (their entropy per token, 200000 draws): 2.77
The floor (models/prompt_lm.py perplexity_floor) is what no model can beat: the held-in perplexity ends within
about 1% of it. Held out is higher by construction: its colour-shape pairs never occur in the training captions,
and the LM has learnt that (it will not propose them either). Measured figures in docs/results.md.
"""
import time
from dataclasses import dataclass, field

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from core.checkpoint import save_checkpoint
from core.config import format_config, parse_config
from core.runtime import autocast, get_device, run_cli, seed_everything
from data.dataset import DataConfig, load_data
from data.shapes import sample_scene
from models.prompt_lm import (PromptLM, PromptLMConfig, check_config, load_prompt_lm, perplexity, perplexity_floor,
                              rewrite)
from models.tokenizer import BPETokenizer, TokenizerConfig
from train.common import (TrainConfig, batch_indices, end_step, open_run, resume_state, set_learning_rate,
                          stopped_early, training_state)

FILLED_IN = ("model.vocab_size",)  # set here from the tokenizer
TEMPERATURES = (0.7, 1.0, 1.5)     # of the captions sampled at the end


@dataclass
class PromptLMTrain(TrainConfig):
    steps: int = 1000             # optimizer steps
    batch_size: int = 64          # captions per step
    lr: float = 3e-3              # peak AdamW learning rate
    weight_decay: float = 0.01    # AdamW decoupled weight decay (matrices only)
    grad_clip: float = 1.0        # max global gradient norm
    min_lr_ratio: float = 0.05    # final learning rate as a fraction of lr
    eval_captions: int = 2000     # fresh captions per split for the final perplexity (shapes only; 0 = skip)
    eval_seed: int = 1            # scene seed of the evaluation captions (must differ from data.seed)
    floor_captions: int = 200000  # held-in captions drawn for the perplexity floor (shapes only; 0 = skip)
    sample_prompts: tuple[str, ...] = ("a red circle", "a small", "an image of")  # prefixes sampled at the end


@dataclass
class PromptLMTrainConfig:
    model: PromptLMConfig = field(default_factory=PromptLMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)  # only the captions are used
    train: PromptLMTrain = field(default_factory=PromptLMTrain)


def captions_of(data_cfg: DataConfig, num, seed, split):
    if data_cfg.dataset == "shapes":
        return [sample_scene(seed, i, split, data_cfg.max_objects)[0] for i in range(num)]
    return load_data(data_cfg).captions


def main(argv=None):
    cfg, config_path = parse_config(PromptLMTrainConfig, argv, description=__doc__.split("\n")[0])
    check_config(cfg.model)
    tc = cfg.train
    if tc.eval_captions and tc.eval_seed == cfg.data.seed:
        raise ValueError("train.eval_seed must differ from data.seed so that the evaluation captions are unseen")
    out_dir, resumed = open_run(cfg, config_path, "prompt_lm", ("model", "tokenizer", "data"), "prompt_lm", FILLED_IN)
    ckpt_path = out_dir / "ckpt.pt"
    device = get_device(tc.device)
    seed_everything(tc.seed)

    # ---- data: captions only, tokenized once
    captions = captions_of(cfg.data, cfg.data.num_images, cfg.data.seed, cfg.data.split)
    if resumed:
        tokenizer = BPETokenizer.from_state_dict(resumed["tokenizer"])
    else:
        tokenizer = BPETokenizer.train(captions, cfg.tokenizer.vocab_size)
    cfg.model.vocab_size = tokenizer.vocab_size
    all_ids, all_mask = tokenizer(captions, max_length=cfg.model.max_length, truncate=True)  # (N, L)
    cut = tokenizer.truncation_report(captions, cfg.model.max_length)
    if cut:
        print(cut, flush=True)
    N = len(captions)

    # ---- model, optimizer
    model = PromptLM(cfg.model).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "pos"]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n != "pos")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=tc.betas)
    start_step = resume_state(resumed, model, optimizer, what="prompt LM weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(format_config(cfg) + "\n")
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{N} captions, tokenizer vocab {tokenizer.vocab_size}, {n_params / 1e6:.2f}M parameters, "
          f"{cfg.model.max_length} positions, device {device}, writing to {out_dir}", flush=True)

    # ---- the loop
    model.train()
    end = end_step(tc, start_step)
    t0 = time.time()
    bar = tqdm(range(start_step, end), initial=start_step, total=tc.steps, desc="prompt_lm", dynamic_ncols=True)
    for step in bar:
        idx = batch_indices(step, tc.batch_size, N, tc.seed)  # (B,)
        ids, mask = all_ids[idx].to(device), all_mask[idx].to(device)  # (B, L)
        lr = set_learning_rate(optimizer, tc, step)
        with autocast(device, tc.bf16):
            loss = model.loss(ids, mask)  # GPT-2 Eq. 1, padding ignored
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else 1e9)
        optimizer.step()
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            for k, v in (("loss", loss.item()), ("lr", lr), ("grad_norm", grad_norm.item())):
                writer.add_scalar(f"train/{k}", v, done)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            tqdm.write(f"step {done} | loss {loss.item():.4f} | lr {lr:.2e} | grad norm {grad_norm.item():.3f} | "
                       f"{time.time() - t0:.0f}s")
        if done % tc.ckpt_every == 0 or done in (tc.steps, end):
            save_checkpoint(ckpt_path, training_state("prompt_lm", cfg, done, model, optimizer,
                                                      tokenizer=tokenizer.state_dict()))
    train_time = time.time() - t0
    if stopped_early(writer, ckpt_path, end, tc, train_time):
        return
    print(f"saved {ckpt_path} at step {end} of {tc.steps} ({train_time:.0f}s of training this run)", flush=True)

    # ---- through the checkpoint: perplexity on fresh captions, and sampled captions at three temperatures
    model, tokenizer = load_prompt_lm(ckpt_path, device)
    if cfg.data.dataset == "shapes" and tc.eval_captions:
        figures = {name: perplexity(model, tokenizer, captions_of(cfg.data, tc.eval_captions, tc.eval_seed, split))
                   for split, name in (("train", "heldin"), ("heldout", "heldout"))}
        for name, value in figures.items():
            writer.add_scalar(f"eval/perplexity_{name}", value, end)
        print(f"perplexity per token on {tc.eval_captions} fresh captions (seed {tc.eval_seed}): "
              + " | ".join(f"{name} {value:.3f}" for name, value in figures.items()), flush=True)
    if cfg.data.dataset == "shapes" and tc.floor_captions:
        floor = perplexity_floor(captions_of(cfg.data, tc.floor_captions, tc.eval_seed, "train"), tokenizer)
        writer.add_scalar("eval/perplexity_floor", floor, end)
        print(f"perplexity floor of the held-in captions (their entropy per token, {tc.floor_captions} draws): "
              f"{floor:.3f}", flush=True)
    lines = []
    g = torch.Generator(device).manual_seed(tc.seed)
    for temperature in TEMPERATURES:
        for prompt, used in zip(tc.sample_prompts, rewrite(model, tokenizer, tc.sample_prompts, temperature,
                                                            generator=g)):
            lines.append(f"temperature {temperature:g}: {prompt!r} -> {used!r}")
    print("sampled captions:\n  " + "\n  ".join(lines), flush=True)
    writer.add_text("samples", "\n\n".join(lines), end)
    (out_dir / "samples.txt").write_text("\n".join(lines) + "\n")
    writer.close()


if __name__ == "__main__":
    run_cli(main)
