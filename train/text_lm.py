"""Train the text-only masked language model (models/text_lm.py) on captions alone.

Paper: Devlin et al. 2018, BERT, arXiv 1810.04805, Sec. 3.1 (masked LM, 15% of tokens, 80/10/10) and App. A.2
(Adam with warm-up and decay); the frozen-text-encoder idea is Imagen's (Saharia et al. 2022, arXiv 2205.11487).

    python -m train.text_lm --config configs/shapes/text_lm.yaml

The shapes captions come from data/shapes.py's scene sampler without rendering a pixel; other datasets
(data.dataset=folder:... / hub:...) are loaded and only their captions kept. Writes out_dir/ckpt.pt (kind
"text_lm": config, weights, tokenizer) and out_dir/config.yaml, and ends with the masked-token accuracy on fresh
captions (another seed): mask_prob of the real tokens (not <start>/<end>) chosen, all replaced by [MASK] (no
random or kept tokens at evaluation), and the accuracy is the fraction of them predicted exactly, over all
masked tokens and split in two: the attribute words (colour, shape, size, background colour), which the shapes
captions draw at random, so that a masked one cannot be inferred from the rest (chance: about 1/8 for a colour
given its shape, 1/7 for a shape, 1/2 for a size, 1/4 for a background), and every other token (articles, prefixes,
"on", "background", plural endings), which the caption grammar mostly determines (not the prefix's noun, which
is random too):
    masked-token accuracy ... heldin all 0.6xx (grammar 0.9xx, attribute words 0.2xx) | heldout ...
(measured figures in configs/shapes/text_lm.yaml)
"""
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from core.checkpoint import save_checkpoint
from core.config import format_config, parse_config
from core.runtime import autocast, get_device, run_cli, seed_everything
from data.dataset import DataConfig, load_data
from data.shapes import BACKGROUNDS, COLOURS, PLURALS, SHAPES, SIZES, sample_scene
from models.text_encoder import TextEncoderConfig
from models.text_lm import MaskedLanguageModel, load_text_lm, mask_tokens, masked_lm_loss
from models.tokenizer import BPETokenizer, TokenizerConfig
from train.common import (TrainConfig, batch_indices, end_step, open_run, resume_state, set_learning_rate,
                          step_generator, training_state)

ATTRIBUTE_WORDS = {*COLOURS, *SHAPES, *PLURALS.values(), *SIZES, *BACKGROUNDS}  # drawn at random in a caption


FILLED_IN = ("text.vocab_size",)  # config keys main() sets before storing the config (core.config.config_changes)


@dataclass
class MaskingConfig:
    mask_prob: float = 0.15       # BERT: fraction of real tokens chosen for prediction
    random_prob: float = 0.1      # of the chosen: replaced by a random token
    keep_prob: float = 0.1        # of the chosen: left unchanged (the rest become [MASK])


@dataclass
class TextLMTrain(TrainConfig):
    steps: int = 1500             # optimizer steps
    batch_size: int = 256         # captions per step
    lr: float = 1e-3              # peak AdamW learning rate
    weight_decay: float = 0.01    # AdamW decoupled weight decay (BERT App. A.2)
    min_lr_ratio: float = 0.01    # final learning rate as a fraction of lr
    eval_captions: int = 2000     # fresh captions per split for the final accuracy (shapes only; 0 = skip)
    eval_seed: int = 1            # scene seed of the evaluation captions (must differ from data.seed)


@dataclass
class TextLMTrainConfig:
    # the encoder; vocab_size is set to the tokenizer's + 1 ([MASK]); width = the U-Net's context_dim later
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(max_length=16, width=64, layers=2,
                                                                              heads=4, causal=False))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)  # only the captions are used
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    train: TextLMTrain = field(default_factory=TextLMTrain)


def captions_of(data_cfg: DataConfig, num, seed, split):
    if data_cfg.dataset == "shapes":
        return [sample_scene(seed, i, split, data_cfg.max_objects)[0] for i in range(num)]
    return load_data(data_cfg).captions


@torch.no_grad()
def masked_accuracy(model, tokenizer, captions, mask_prob, seed, batch_size=512):
    """Fraction of masked tokens predicted exactly (every chosen token is replaced by [MASK]): over all of them,
    over the tokens that decode to an ATTRIBUTE_WORDS word, and over the others. -> {"all", "grammar",
    "attribute words"}."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    special = {tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id}
    is_attribute = torch.tensor([tokenizer.decode([i]).strip() in ATTRIBUTE_WORDS if i < tokenizer.vocab_size
                                 else False for i in range(model.cfg.vocab_size)])  # (V,)
    right, total = torch.zeros(2), torch.zeros(2)  # [grammar, attribute words]
    for i in range(0, len(captions), batch_size):
        ids, mask = tokenizer(captions[i: i + batch_size], max_length=model.cfg.max_length, truncate=True)
        corrupted, chosen = mask_tokens(ids, mask, special, model.mask_id, model.cfg.vocab_size, g, mask_prob,
                                        random_prob=0.0, keep_prob=0.0)
        predicted = model(corrupted.to(device), mask.to(device)).argmax(-1).cpu()  # (b, L)
        kind = is_attribute[ids[chosen]].long()  # (n,) 0 grammar, 1 attribute word
        right += torch.bincount(kind, weights=(predicted[chosen] == ids[chosen]).float(), minlength=2)
        total += torch.bincount(kind, minlength=2).float()
    accuracy = (right / total.clamp(min=1)).tolist()
    return {"all": (right.sum() / total.sum().clamp(min=1)).item(), "grammar": accuracy[0],
            "attribute words": accuracy[1]}


def main(argv=None):
    cfg, config_path = parse_config(TextLMTrainConfig, argv, description=__doc__.split("\n")[0])
    tc, mc = cfg.train, cfg.masking
    if tc.eval_captions and tc.eval_seed == cfg.data.seed:
        raise ValueError("train.eval_seed must differ from data.seed so that the evaluation captions are unseen")
    if not 0 < mc.mask_prob < 1 or mc.random_prob + mc.keep_prob > 1:
        raise ValueError("masking.mask_prob must be in (0, 1) and masking.random_prob + masking.keep_prob at most 1")
    if cfg.text.causal:
        raise ValueError("a masked language model reads both ways; set text.causal=false")
    out_dir, resumed = open_run(cfg, config_path, "text_lm", ("text", "tokenizer", "data", "masking"), "text_lm",
                                FILLED_IN)
    ckpt_path = out_dir / "ckpt.pt"
    device = get_device(tc.device)
    seed_everything(tc.seed)

    # ---- data: captions only, tokenized once
    captions = captions_of(cfg.data, cfg.data.num_images, cfg.data.seed, cfg.data.split)
    if resumed:
        tokenizer = BPETokenizer.from_state_dict(resumed["tokenizer"])
    else:
        tokenizer = BPETokenizer.train(captions, cfg.tokenizer.vocab_size)
    all_ids, all_mask = tokenizer(captions, max_length=cfg.text.max_length, truncate=True)  # (N, L)
    cut = tokenizer.truncation_report(captions, cfg.text.max_length)
    if cut:
        print(cut, flush=True)
    special = {tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id}
    N = len(captions)

    # ---- model, optimizer
    cfg.text = TextEncoderConfig(**{**cfg.text.__dict__, "vocab_size": tokenizer.vocab_size + 1})  # + [MASK]
    model = MaskedLanguageModel(cfg.text).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    start_step = resume_state(resumed, model, optimizer, what="text LM weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(format_config(cfg) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{N} captions, tokenizer vocab {tokenizer.vocab_size} (+ [MASK]), {n_params / 1e6:.2f}M parameters, "
          f"device {device}, writing to {out_dir}", flush=True)

    # ---- the loop
    model.train()
    end = end_step(tc, start_step)
    t0 = time.time()
    bar = tqdm(range(start_step, end), initial=start_step, total=tc.steps, desc="text_lm", dynamic_ncols=True)
    for step in bar:
        idx = batch_indices(step, tc.batch_size, N, tc.seed)  # (B,)
        ids, mask = all_ids[idx], all_mask[idx]  # (B, L)
        corrupted, chosen = mask_tokens(ids, mask, special, model.mask_id, cfg.text.vocab_size,
                                        step_generator(tc.seed, step), mc.mask_prob, mc.random_prob, mc.keep_prob)
        lr = set_learning_rate(optimizer, tc, step)
        with autocast(device, tc.bf16):
            logits = model(corrupted.to(device), mask.to(device))  # (B, L, V)
            loss = masked_lm_loss(logits.float(), ids.to(device), chosen.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            tqdm.write(f"step {done} | loss {loss.item():.4f} | lr {lr:.2e} | {time.time() - t0:.0f}s")
        if done % tc.ckpt_every == 0 or done == end:
            save_checkpoint(ckpt_path, training_state("text_lm", cfg, done, model, optimizer,
                                                      tokenizer=tokenizer.state_dict()))
    print(f"saved {ckpt_path} at step {end} of {tc.steps} ({time.time() - t0:.0f}s this run)", flush=True)
    if end < tc.steps:
        return

    # ---- masked-token accuracy on fresh captions, through the checkpoint
    if cfg.data.dataset != "shapes" or not tc.eval_captions:
        return
    model, tokenizer, _ = load_text_lm(ckpt_path, device)
    figures = {name: masked_accuracy(model, tokenizer, captions_of(cfg.data, tc.eval_captions, tc.eval_seed, split),
                                     mc.mask_prob, tc.eval_seed)
               for split, name in (("train", "heldin"), ("heldout", "heldout"))}
    print(f"masked-token accuracy on {tc.eval_captions} fresh captions per split (seed {tc.eval_seed}, "
          f"{mc.mask_prob:.0%} of tokens masked): " + " | ".join(
              f"{name} all {f['all']:.3f} (grammar {f['grammar']:.3f}, attribute words {f['attribute words']:.3f})"
              for name, f in figures.items()), flush=True)


if __name__ == "__main__":
    run_cli(main)
