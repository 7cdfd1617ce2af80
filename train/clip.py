"""Train CLIP (models/clip.py) on image-caption pairs with the symmetric contrastive loss, then evaluate it.

Paper: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
arXiv 2103.00020: Fig. 3 (the loss), Sec. 2.5 (AdamW, cosine schedule, learned temperature clipped at 100),
Sec. 3.1 (zero-shot classification: the class whose caption embedding is nearest; Sec. 3.1.4 prompt
ensembling: the embeddings of several templates averaged), Sec. 3.1 / Table 13 (retrieval recall@k).

    python -m train.clip --config configs/shapes/clip.yaml        # conditioning CLIP (conv image tower, seed 0)
    python -m train.clip --config configs/shapes/clip_eval.yaml   # evaluation CLIP (ViT image tower, seed 1)

Writes out_dir/ckpt.pt (kind "clip": config, weights, tokenizer) and out_dir/config.yaml. On the built-in shapes
it ends with (measured figures in configs/shapes/clip.yaml):
    zero-shot heldin   colour 1.000 | shape 0.999 | pair 0.999  (1000 fresh single-object renders, 63 classes)
    retrieval heldin   image->text R@1 0.998 | text->image R@1 1.000 | image->text R@5 1.000 | ...
    zero-shot heldout  colour 1.000 | shape 0.93x | pair 0.93x  (pairs never seen in training)
    retrieval heldout  image->text R@1 0.999 | ...

Zero-shot: each of the 63 (colour, shape) pairs is a class, embedded as the mean of TEMPLATES (Sec. 3.1.4); an
image's colour is the colour with the largest probability summed over shapes, likewise its shape; "pair" is
the argmax class. Held-out images show the 7 pairs of data/shapes.py HELDOUT_PAIRS, never in training.
Retrieval: fresh renders with their captions; image->text ranks the captions for each image, text->image ranks
the images for each caption. Many captions describe several images ("a red circle"), so a hit is a retrieved
item that agrees with every claim of the caption (objects, colours, shapes, stated sizes, relation,
stated background), judged on the true attributes with data.claims.caption_holds.
"""
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from core.checkpoint import save_checkpoint
from core.config import format_config, parse_config
from core.runtime import autocast, get_device, run_cli, seed_everything
from data.claims import caption_holds
from data.dataset import DataConfig, load_data
from data.shapes import ALL_PAIRS, COLOURS, SHAPES, article, render_dataset
from models.clip import CLIP, CLIPConfig, contrastive_loss, embed_images, embed_texts, load_clip
from models.text_encoder import TextEncoderConfig
from models.tokenizer import BPETokenizer
from train.common import (TrainConfig, batch_indices, end_step, memory_format, open_run, resume_state,
                          set_learning_rate, training_state)

TEMPLATES = ("{}", "a photo of {}", "an image of {}", "a picture of {}", "a drawing of {}")


FILLED_IN = ("model.text.vocab_size",)  # config keys main() sets before storing the config (core.config.config_changes)

@dataclass
class ClipTokenizerConfig:
    vocab_size: int = 512  # byte-level BPE trained on the captions: 256 bytes + merges + 3 special tokens
    vocab_file: str = ""  # '' = train that BPE | path to CLIP's bpe_simple_vocab_16e6.txt.gz (49,408 tokens)


@dataclass
class ClipTrain(TrainConfig):
    steps: int = 1000             # optimizer steps
    batch_size: int = 128         # pairs per step: the B x B similarity matrix of the loss
    lr: float = 1e-3              # peak AdamW learning rate (Sec. 2.5: AdamW with cosine decay)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW moments (OpenAI's CLIP: 0.98 for stability)
    weight_decay: float = 0.1     # AdamW decoupled weight decay (not applied to gains, biases, embeddings, scale)
    warmup_steps: int = 50        # linear warm-up, then cosine decay
    min_lr_ratio: float = 0.01    # final learning rate as a fraction of lr
    grad_clip: float = 1.0        # max global gradient norm (0 = off)
    eval_images: int = 1000       # fresh renders per split for the final evaluation (shapes only; 0 = skip)
    eval_seed: int = 1            # rendering seeds of the evaluation images: eval_seed (zero-shot) and eval_seed + 1
    #                               (retrieval); neither may equal data.seed


@dataclass
class ClipTrainConfig:
    model: CLIPConfig = field(default_factory=CLIPConfig)
    tokenizer: ClipTokenizerConfig = field(default_factory=ClipTokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: ClipTrain = field(default_factory=ClipTrain)


def build_tokenizer(cfg: ClipTrainConfig, captions):
    if cfg.tokenizer.vocab_file:
        return BPETokenizer.from_clip_vocab(cfg.tokenizer.vocab_file)
    return BPETokenizer.train(captions, cfg.tokenizer.vocab_size)


def parameter_groups(model, weight_decay):
    """Decay only matrices of Linear/Conv layers; LayerNorm/GroupNorm gains, biases, embeddings, positions and
    the logit scale are not decayed (as in OpenAI's and open_clip's training code)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        no = p.ndim < 2 or "embedding" in name or name == "logit_scale"
        (no_decay if no else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------- evaluation

def render(num_images, resolution, seed, split, max_objects):
    images, captions, attributes = render_dataset(num_images, resolution, seed, split, max_objects, progress=False)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions, attributes  # (N, 3, R, R)


def zero_shot(model, tokenizer, images, attributes):
    """Sec. 3.1: classify each image among the 63 (colour, shape) pairs, each embedded as the normalised mean
    of its TEMPLATES embeddings (Sec. 3.1.4). Returns accuracy of colour, shape (marginals) and pair."""
    texts = [t.format(f"{article(c)} {c} {s}") for c, s in ALL_PAIRS for t in TEMPLATES]
    T_e = embed_texts(model, tokenizer, texts).view(len(ALL_PAIRS), len(TEMPLATES), -1).mean(1)  # (63, E)
    T_e = torch.nn.functional.normalize(T_e, dim=-1)
    probs = (100 * embed_images(model, images) @ T_e.t()).softmax(-1).cpu()  # (N, 63)
    colours, shapes = list(COLOURS), list(SHAPES)
    by_colour = torch.zeros(len(ALL_PAIRS), len(colours)).index_put_(
        (torch.arange(len(ALL_PAIRS)), torch.tensor([colours.index(c) for c, _ in ALL_PAIRS])), torch.tensor(1.0))
    by_shape = torch.zeros(len(ALL_PAIRS), len(shapes)).index_put_(
        (torch.arange(len(ALL_PAIRS)), torch.tensor([shapes.index(s) for _, s in ALL_PAIRS])), torch.tensor(1.0))
    true_colour = torch.tensor([colours.index(a["objects"][0]["colour"]) for a in attributes])
    true_shape = torch.tensor([shapes.index(a["objects"][0]["shape"]) for a in attributes])
    true_pair = torch.tensor([ALL_PAIRS.index((a["objects"][0]["colour"], a["objects"][0]["shape"]))
                              for a in attributes])
    return {"colour": ((probs @ by_colour).argmax(-1) == true_colour).float().mean().item(),
            "shape": ((probs @ by_shape).argmax(-1) == true_shape).float().mean().item(),
            "pair": (probs.argmax(-1) == true_pair).float().mean().item()}


def retrieval(model, tokenizer, images, captions, attributes, ks=(1, 5)):
    """Recall@k both ways over N images and their N captions; a hit is an item whose caption holds."""
    sim = (embed_images(model, images) @ embed_texts(model, tokenizer, captions).t()).cpu()  # (N images, N texts)
    top = sim.topk(max(ks), dim=1).indices  # (N, k): captions ranked for each image
    top_t = sim.t().topk(max(ks), dim=1).indices  # (N, k): images ranked for each caption
    out = {}
    for k in ks:
        out[f"image->text R@{k}"] = sum(any(caption_holds(captions[j], attributes[i]) for j in top[i, :k].tolist())
                                        for i in range(len(captions))) / len(captions)
        out[f"text->image R@{k}"] = sum(any(caption_holds(captions[j], attributes[i]) for i in top_t[j, :k].tolist())
                                        for j in range(len(captions))) / len(captions)
    return out


def evaluate(model, tokenizer, data_cfg: DataConfig, num_images, seed):
    """Zero-shot and retrieval on fresh shapes renders of `seed`, held-in and held-out pairs."""
    model.eval()
    results = {}
    for split, name in (("train", "heldin"), ("heldout", "heldout")):
        images, _, attributes = render(num_images, data_cfg.resolution, seed, split, max_objects=1)
        results[f"zero-shot {name}"] = zero_shot(model, tokenizer, images, attributes)
        images, captions, attributes = render(num_images, data_cfg.resolution, seed + 1, split, data_cfg.max_objects)
        # seed + 1: other scenes than the zero-shot ones; main() checks that neither seed is data.seed
        results[f"retrieval {name}"] = retrieval(model, tokenizer, images, captions, attributes)
    return results


# ---------------------------------------------------------------- training

def main(argv=None):
    cfg, config_path = parse_config(ClipTrainConfig, argv, description=__doc__.split("\n")[0])
    tc = cfg.train
    if cfg.model.vision.image_size != cfg.data.resolution:
        raise ValueError(f"model.vision.image_size ({cfg.model.vision.image_size}) must equal data.resolution "
                         f"({cfg.data.resolution}); set both")
    if tc.batch_size < 2 or cfg.data.num_images < tc.batch_size:
        raise ValueError("train.batch_size must be >= 2 (the loss contrasts pairs within a batch) and "
                         "data.num_images >= train.batch_size")
    if tc.eval_images and cfg.data.seed in (tc.eval_seed, tc.eval_seed + 1):
        raise ValueError(f"the evaluation renders seeds train.eval_seed ({tc.eval_seed}) and train.eval_seed + 1; "
                         f"both must differ from data.seed ({cfg.data.seed}) so that the evaluation images are unseen")
    out_dir, resumed = open_run(cfg, config_path, "clip", ("model", "tokenizer", "data"), "clip", FILLED_IN)
    ckpt_path = out_dir / "ckpt.pt"
    device = get_device(tc.device)
    seed_everything(tc.seed)

    # ---- data: images in memory, captions tokenized once
    data = load_data(cfg.data)
    tokenizer = BPETokenizer.from_state_dict(resumed["tokenizer"]) if resumed else build_tokenizer(cfg, data.captions)
    L = cfg.model.text.max_length
    all_ids, all_mask = tokenizer(data.captions, max_length=L, truncate=True)  # (N, L)
    cut = tokenizer.truncation_report(data.captions, L)
    if cut:
        print(cut, flush=True)
    N = len(data)

    # ---- model, optimizer
    model_cfg = CLIPConfig(**{**cfg.model.__dict__, "text": TextEncoderConfig(
        **{**cfg.model.text.__dict__, "vocab_size": tokenizer.vocab_size})})
    cfg.model = model_cfg  # stored in the checkpoint with the vocabulary size filled in (FILLED_IN)
    model = CLIP(model_cfg).to(device)
    layout = memory_format(tc, model)  # train.channels_last (the image tower's convolutions)
    optimizer = torch.optim.AdamW(parameter_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas, eps=1e-6)
    start_step = resume_state(resumed, model, optimizer, what="CLIP checkpoint weights")
    n_params = sum(p.numel() for p in model.parameters())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(format_config(cfg) + "\n")
    print(f"{N} image-caption pairs, tokenizer vocab {tokenizer.vocab_size}, {n_params / 1e6:.2f}M parameters "
          f"(image tower {cfg.model.vision.kind}), device {device}, writing to {out_dir}", flush=True)

    def checkpoint(step):
        save_checkpoint(ckpt_path, training_state("clip", cfg, step, model, optimizer,
                                                  tokenizer=tokenizer.state_dict()))

    # ---- the loop
    model.train()
    end = end_step(tc, start_step)
    t0 = time.time()
    bar = tqdm(range(start_step, end), initial=start_step, total=tc.steps, desc="clip", dynamic_ncols=True)
    for step in bar:
        idx = batch_indices(step, tc.batch_size, N, tc.seed)  # (B,)
        x = data.batch(idx)[0].to(device)  # (B, 3, H, W) in [-1, 1]
        length = int(all_mask[idx].sum(1).max())  # drop the columns that are padding in every row
        ids, mask = all_ids[idx, :length].to(device), all_mask[idx, :length].to(device)  # (B, l)
        lr = set_learning_rate(optimizer, tc, step)
        with autocast(device, tc.bf16):
            loss, logits = contrastive_loss(model.encode_image(layout(x)).float(), model.encode_text(ids, mask).float(),
                                            model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        model.clamp_logit_scale()  # Sec. 2.5
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            accuracy = (logits.argmax(1) == torch.arange(len(idx), device=device)).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            tqdm.write(f"step {done} | loss {loss.item():.4f} | in-batch image->text acc {accuracy:.3f} | "
                       f"logit scale {model.logit_scale.exp().item():.1f} | lr {lr:.2e} | {time.time() - t0:.0f}s")
        if done % tc.ckpt_every == 0 or done == end:
            checkpoint(done)
    print(f"saved {ckpt_path} at step {end} of {tc.steps} ({time.time() - t0:.0f}s of training this run)", flush=True)
    if end < tc.steps:
        return

    # ---- evaluation through the checkpoint, as users will load it
    if cfg.data.dataset != "shapes" or not tc.eval_images:
        return
    model, tokenizer, _ = load_clip(ckpt_path, device)
    t1 = time.time()
    results = evaluate(model, tokenizer, cfg.data, tc.eval_images, tc.eval_seed)
    print(f"evaluation on {tc.eval_images} fresh renders per split (zero-shot seed {tc.eval_seed}, retrieval seed "
          f"{tc.eval_seed + 1}), {time.time() - t1:.0f}s:")
    for name, figures in results.items():
        print(f"{name:18s} " + " | ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
    if cfg.data.split != "train":
        print(f"data.split={cfg.data.split}: the 'heldout' pairs were in this CLIP's training data", flush=True)


if __name__ == "__main__":
    run_cli(main)
