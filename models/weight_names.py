"""Name maps: the parameters of our modules under the names of the published Stable Diffusion v1 layouts.

Stable Diffusion v1 (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
arXiv 2112.10752; the released v1.x weights) is published in two layouts:
    diffusers  a folder per component: unet/ (diffusers' UNet2DConditionModel), vae/ (AutoencoderKL), text_encoder/
               (transformers' CLIPTextModel), tokenizer/, scheduler/
    CompVis    one file (.ckpt / .safetensors) with the names of the original code: model.diffusion_model.*
               (ldm/modules/diffusionmodules/openaimodel.py), first_stage_model.* (.../model.py),
               cond_stage_model.transformer.* (a transformers CLIPTextModel there too), and the schedule's buffers
Our modules keep names of their own where the papers' structure reads better (models/unet.py: down_blocks.1.0.res
for a level's first ResBlock), diffusers' where nothing is lost (models/vae.py), OpenAI's for CLIP (models/clip.py).

Each map below lists every parameter of one of our modules, built from its config, with the name(s) it has in a
layout: {our name: (their name, ...)}. Several names are stacked along dim 0 into one of ours (OpenAI's CLIP keeps
q, k and v in one in_proj_weight; Hugging Face has q_proj, k_proj, v_proj). models/stable_diffusion.py reads
published files through these maps and writes diffusers folders through them; tests/test_published_weights.py
checks them against diffusers' and transformers' own modules and against diffusers' CompVis converter.
`gather` applies a map in the reading direction and `scatter` in the writing one.

Where a layout stores a 1x1 convolution and ours a Linear (the U-Net's proj_in / proj_out in SD v1, the VAE's
attention in CompVis' files), the (O, I, 1, 1) weight is the (O, I) matrix: gather drops the two unit dims.
"""
import torch

from models.text_encoder import TextEncoderConfig
from models.unet import UNet, UNetConfig
from models.vae import AutoencoderKL, VAEConfig

LAYOUTS = ("diffusers", "compvis")

# ---------------------------------------------------------------- U-Net

# Inside one ResBlock: (ours, diffusers' ResnetBlock2D, CompVis' ResBlock)
RESBLOCK_PARTS = [
    ("norm1", "norm1", "in_layers.0"),
    ("conv1", "conv1", "in_layers.2"),
    ("emb_proj", "time_emb_proj", "emb_layers.1"),
    ("norm2", "norm2", "out_layers.0"),
    ("conv2", "conv2", "out_layers.3"),
    ("skip", "conv_shortcut", "skip_connection"),
]
# Inside one SpatialTransformer, the same in both layouts (diffusers kept LDM's names) except two: our blocks.N is
# their transformer_blocks.N, and our Attention's to_out (a Linear) is their to_out.0 ([Linear, Dropout]).
TRANSFORMER_RENAMES = [(".blocks.", ".transformer_blocks."), (".to_out.", ".to_out.0.")]


def unet_prefixes(cfg: UNetConfig):
    """Rows (ours, diffusers, CompVis, kind) naming each module of UNet(cfg) in the order the U-Net runs them; kind
    is "res" (a ResBlock: RESBLOCK_PARTS inside), "attn" (a SpatialTransformer) or "" (a plain layer).
    CompVis numbers the down path's steps input_blocks.1, 2, ... (input_blocks.0 is conv_in), each a ResBlock (.0)
    and at attention levels a SpatialTransformer (.1), a Downsample being a step of its own (.0.op); the up path's
    steps output_blocks.0, 1, ..., the Upsample sitting inside a level's last step after its ResBlock (and
    SpatialTransformer)."""
    levels = len(cfg.channel_mult)
    top = cfg.image_size // cfg.patch_size

    def attention(level):
        return top // 2**level in cfg.attention_resolutions

    rows = [("time_embed.0", "time_embedding.linear_1", "time_embed.0", ""),
            ("time_embed.2", "time_embedding.linear_2", "time_embed.2", ""),
            ("conv_in", "conv_in", "input_blocks.0.0", "")]
    n = 1
    for level in range(levels):
        for i in range(cfg.num_res_blocks):
            rows.append((f"down_blocks.{level}.{i}.res", f"down_blocks.{level}.resnets.{i}", f"input_blocks.{n}.0", "res"))
            if attention(level):
                rows.append((f"down_blocks.{level}.{i}.attn", f"down_blocks.{level}.attentions.{i}",
                             f"input_blocks.{n}.1", "attn"))
            n += 1
        if level < levels - 1:
            rows.append((f"downsamplers.{level}.conv", f"down_blocks.{level}.downsamplers.0.conv",
                         f"input_blocks.{n}.0.op", ""))
            n += 1
    rows += [("mid_res1", "mid_block.resnets.0", "middle_block.0", "res"),
             ("mid_attn", "mid_block.attentions.0", "middle_block.1", "attn"),
             ("mid_res2", "mid_block.resnets.1", "middle_block.2", "res")]
    m = 0
    for k, level in enumerate(reversed(range(levels))):  # our up_blocks.0 is the deepest level, as diffusers'
        for i in range(cfg.num_res_blocks + 1):
            rows.append((f"up_blocks.{k}.{i}.res", f"up_blocks.{k}.resnets.{i}", f"output_blocks.{m}.0", "res"))
            if attention(level):
                rows.append((f"up_blocks.{k}.{i}.attn", f"up_blocks.{k}.attentions.{i}", f"output_blocks.{m}.1", "attn"))
            m += 1
        if level > 0:
            rows.append((f"upsamplers.{k}.conv", f"up_blocks.{k}.upsamplers.0.conv",
                         f"output_blocks.{m - 1}.{2 if attention(level) else 1}.conv", ""))
    rows += [("norm_out", "conv_norm_out", "out.0", ""), ("conv_out", "conv_out", "out.2", "")]
    return rows


def unet_names(cfg: UNetConfig, layout):
    """{our parameter name: (its name in `layout`,)} for every parameter of UNet(cfg) but null_context, the
    null condition of classifier-free guidance, which neither layout stores (models/stable_diffusion.py computes
    Stable Diffusion's from its text encoder). Names in CompVis' layout lack the file's model.diffusion_model."""
    if cfg.pooled_dim or cfg.low_res_channels or cfg.patch_size > 1 or cfg.self_attention_max_resolution:
        raise ValueError("the published layouts have no pooled text vector, super-resolution input, patching or "
                         "cross-attention-only blocks; this U-Net has one (pooled_dim, low_res_channels, patch_size "
                         "or self_attention_max_resolution is set)")
    column = 1 + LAYOUTS.index(layout)
    prefixes = unet_prefixes(cfg)
    with torch.device("meta"):
        ours = [name for name in UNet(cfg).state_dict() if name != "null_context"]
    names = {}
    for name in ours:
        row = next(r for r in prefixes if name.startswith(r[0] + "."))
        rest = name[len(row[0]):]  # ".conv1.weight", ".blocks.0.attn1.to_q.weight", ".weight"
        if row[3] == "res":
            part = next(p for p in RESBLOCK_PARTS if rest.startswith(f".{p[0]}."))
            rest = f".{part[column]}" + rest[len(part[0]) + 1:]
        elif row[3] == "attn":
            for old, new in TRANSFORMER_RENAMES:
                rest = rest.replace(old, new)
        names[name] = (row[column] + rest,)
    return names


# ---------------------------------------------------------------- VAE

# Our VAE has diffusers' names (models/vae.py). CompVis' (ldm/modules/diffusionmodules/model.py), inside a ResnetBlock
# and inside the middle AttnBlock; diffusers before 0.14 named that attention query / key / value / proj_attn.
VAE_RESNET_PARTS = [("conv_shortcut", "nin_shortcut")]  # norm1, conv1, norm2, conv2 are the same
VAE_ATTENTION_PARTS = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
LEGACY_VAE_ATTENTION_PARTS = [("group_norm", "group_norm"), ("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                              ("to_out.0", "proj_attn")]


def vae_prefixes(cfg: VAEConfig):
    """Rows (ours = diffusers, CompVis, kind) for each module of AutoencoderKL(cfg); kind "res", "attn" or "".
    CompVis numbers the decoder's levels from the bottom (decoder.up.0 is the full-resolution level, our
    decoder.up_blocks.0 the deepest)."""
    levels = len(cfg.channel_mult)
    rows = []
    for level in range(levels):
        for i in range(cfg.num_res_blocks):
            rows.append((f"encoder.down_blocks.{level}.resnets.{i}", f"encoder.down.{level}.block.{i}", "res"))
        if level < levels - 1:
            rows.append((f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv", ""))
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", "res"),
                 (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", "attn"),
                 (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", "res")]
    for k in range(levels):
        level = levels - 1 - k
        for i in range(cfg.num_res_blocks + 1):
            rows.append((f"decoder.up_blocks.{k}.resnets.{i}", f"decoder.up.{level}.block.{i}", "res"))
        if k < levels - 1:
            rows.append((f"decoder.up_blocks.{k}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", ""))
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_norm_out", f"{part}.norm_out", ""), (f"{part}.conv_in", f"{part}.conv_in", ""),
                 (f"{part}.conv_out", f"{part}.conv_out", "")]
    rows += [("quant_conv", "quant_conv", ""), ("post_quant_conv", "post_quant_conv", "")]
    return rows


def vae_names(cfg: VAEConfig, layout, legacy_attention=False):
    """{our parameter name: (its name in `layout`,)} for every parameter of AutoencoderKL(cfg). diffusers' names
    are ours, except the middle attention's in folders saved before diffusers 0.14 (legacy_attention=True).
    Names in CompVis' layout lack the file's first_stage_model."""
    with torch.device("meta"):
        ours = list(AutoencoderKL(cfg).state_dict())
    attention_parts = LEGACY_VAE_ATTENTION_PARTS if legacy_attention else VAE_ATTENTION_PARTS
    names = {}
    for name in ours:
        if layout == "diffusers":
            theirs = name
            if legacy_attention and ".attentions.0." in name:
                theirs = _rename_part(name, name[:name.index(".attentions.0.") + len(".attentions.0")], attention_parts)
            names[name] = (theirs,)
            continue
        row = next(r for r in vae_prefixes(cfg) if name.startswith(r[0] + "."))
        rest = name[len(row[0]):]
        if row[2] == "res":
            rest = rest.replace(".conv_shortcut.", ".nin_shortcut.")
        elif row[2] == "attn":
            rest = _rename_part(rest, "", VAE_ATTENTION_PARTS)
        names[name] = (row[1] + rest,)
    return names


def _rename_part(name, prefix, parts):
    """prefix + "." + part + rest -> prefix + "." + their part + rest, for the first (ours, theirs) in parts."""
    rest = name[len(prefix):]
    ours, theirs = next(p for p in parts if rest.startswith(f".{p[0]}."))
    return prefix + f".{theirs}" + rest[len(ours) + 1:]


# ---------------------------------------------------------------- text encoders (as transformers' CLIPTextModel)

def clip_text_names(cfg: TextEncoderConfig):
    """{our name: (Hugging Face CLIPTextModel names,)} for CLIP's text tower (models/clip.py, OpenAI's names) in
    Hugging Face's layout (embeddings.*, encoder.layers.N.*, final_layer_norm.*; files add text_model. in front,
    CompVis' cond_stage_model.transformer.text_model.). OpenAI's fused in_proj is q_proj, k_proj, v_proj stacked."""
    names = {"token_embedding.weight": ("embeddings.token_embedding.weight",),
             "positional_embedding": ("embeddings.position_embedding.weight",)}
    for i in range(cfg.layers):
        ours, theirs = f"transformer.resblocks.{i}", f"encoder.layers.{i}"
        for kind in ("weight", "bias"):
            names[f"{ours}.attn.in_proj_{kind}"] = tuple(f"{theirs}.self_attn.{p}_proj.{kind}" for p in "qkv")
            for our_part, their_part in [("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"),
                                         ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
                names[f"{ours}.{our_part}.{kind}"] = (f"{theirs}.{their_part}.{kind}",)
    for kind in ("weight", "bias"):
        names[f"ln_final.{kind}"] = (f"final_layer_norm.{kind}",)
    return names


def text_encoder_names(cfg: TextEncoderConfig):
    """{our name: (Hugging Face CLIPTextModel name,)} for the jointly trained transformer (models/text_encoder.py):
    the same pre-LN blocks as CLIP's with separate q, k, v and a GELU MLP (CLIPTextModel's hidden_act="gelu").
    CLIPTextModel is always causal, so only a causal encoder computes the same function there."""
    names = {"token_embedding.weight": ("embeddings.token_embedding.weight",),
             "position_embedding": ("embeddings.position_embedding.weight",)}
    for i in range(cfg.layers):
        ours, theirs = f"blocks.{i}", f"encoder.layers.{i}"
        for kind in ("weight", "bias"):
            for our_part, their_part in [("norm1", "layer_norm1"), ("attn.to_q", "self_attn.q_proj"),
                                         ("attn.to_k", "self_attn.k_proj"), ("attn.to_v", "self_attn.v_proj"),
                                         ("attn.to_out", "self_attn.out_proj"), ("norm2", "layer_norm2"),
                                         ("mlp.net.0.0", "mlp.fc1"), ("mlp.net.2", "mlp.fc2")]:
                names[f"{ours}.{our_part}.{kind}"] = (f"{theirs}.{their_part}.{kind}",)
    for kind in ("weight", "bias"):
        names[f"final_norm.{kind}"] = (f"final_layer_norm.{kind}",)
    return names


# ---------------------------------------------------------------- applying a map

def gather(read, names, shapes, what):
    """Our state dict from their tensors. read(their name) -> tensor (KeyError when absent); names: a map above
    with their names as stored (any prefix added); shapes: {our name: torch.Size}. Their tensors listed for one of
    ours are stacked along dim 0; a (O, I, 1, 1) 1x1-conv weight fills an (O, I) Linear. Every name missing and
    every shape that does not fit is listed in one ValueError. Returns (state dict, set of their names read)."""
    state, missing, wrong, used = {}, [], [], set()
    for ours, theirs in names.items():
        try:
            tensors = [read(name) for name in theirs]
        except KeyError:
            missing += [name for name in theirs]
            continue
        used.update(theirs)
        tensor = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        if tensor.ndim == 4 and tensor.shape[2:] == (1, 1) and len(shapes[ours]) == 2:
            tensor = tensor[:, :, 0, 0]  # (O, I, 1, 1) -> (O, I): a 1x1 convolution is a Linear on each pixel
        if tensor.shape != shapes[ours]:
            wrong.append(f"{'+'.join(theirs)} {tuple(tensor.shape)} for {ours} {tuple(shapes[ours])}")
            continue
        state[ours] = tensor
    if missing or wrong:
        parts = [f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"] * bool(missing)
        parts += [f"{len(wrong)} of another shape ({'; '.join(wrong[:2])})"] * bool(wrong)
        raise ValueError(f"{what}: {'; '.join(parts)}; the file is not Stable Diffusion v1's layout or is damaged")
    return state, used


def scatter(state, names, prefix=""):
    """Their state dict from ours: the reverse of gather (a stacked tensor is split back into its parts)."""
    out = {}
    for ours, theirs in names.items():
        for name, tensor in zip(theirs, state[ours].chunk(len(theirs))):
            out[prefix + name] = tensor.contiguous()
    return out


def check_all_used(keys, used, what, explained=()):
    """Every key of a file is either read by a map or explained (a buffer derived from what was read, a second
    copy of the weights): else a ValueError listing the first unused ones."""
    unused = sorted(set(keys) - set(used) - set(explained))
    if unused:
        raise ValueError(f"{what} has {len(unused)} key(s) that Stable Diffusion v1's layout does not use: "
                         f"{', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}")
