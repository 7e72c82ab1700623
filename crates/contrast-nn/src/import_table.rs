//! open_clip's names → this trainer's (CLIP method with a ViT image tower and
//! the text tower): the declared table of [`crate::import`]. Each entry is an
//! open_clip key pattern, with `{}` for the block index, and its name here;
//! `T` marks a projection stored transposed (`x @ proj` there, a Linear here).

/// (open_clip key, name here, transposed). `{}` stands for a block index.
const TABLE: &[(&str, &str, bool)] = &[
    ("visual.conv1.weight", "backbone.patch_embed.proj.weight", false),
    ("visual.class_embedding", "backbone.cls_token", false),
    ("visual.positional_embedding", "backbone.pos_embed", false),
    ("visual.ln_pre.weight", "backbone.norm_pre.weight", false),
    ("visual.ln_pre.bias", "backbone.norm_pre.bias", false),
    ("visual.ln_post.weight", "backbone.norm.weight", false),
    ("visual.ln_post.bias", "backbone.norm.bias", false),
    ("visual.proj", "image_proj.weight", true),
    ("visual.transformer.resblocks.{}.ln_1.weight", "backbone.blocks.{}.norm1.weight", false),
    ("visual.transformer.resblocks.{}.ln_1.bias", "backbone.blocks.{}.norm1.bias", false),
    ("visual.transformer.resblocks.{}.attn.in_proj_weight", "backbone.blocks.{}.attn.qkv.weight", false),
    ("visual.transformer.resblocks.{}.attn.in_proj_bias", "backbone.blocks.{}.attn.qkv.bias", false),
    ("visual.transformer.resblocks.{}.attn.out_proj.weight", "backbone.blocks.{}.attn.proj.weight", false),
    ("visual.transformer.resblocks.{}.attn.out_proj.bias", "backbone.blocks.{}.attn.proj.bias", false),
    ("visual.transformer.resblocks.{}.ln_2.weight", "backbone.blocks.{}.norm2.weight", false),
    ("visual.transformer.resblocks.{}.ln_2.bias", "backbone.blocks.{}.norm2.bias", false),
    ("visual.transformer.resblocks.{}.mlp.c_fc.weight", "backbone.blocks.{}.mlp.fc1.weight", false),
    ("visual.transformer.resblocks.{}.mlp.c_fc.bias", "backbone.blocks.{}.mlp.fc1.bias", false),
    ("visual.transformer.resblocks.{}.mlp.c_proj.weight", "backbone.blocks.{}.mlp.fc2.weight", false),
    ("visual.transformer.resblocks.{}.mlp.c_proj.bias", "backbone.blocks.{}.mlp.fc2.bias", false),
    ("token_embedding.weight", "text.token_embedding.weight", false),
    ("positional_embedding", "text.positional_embedding", false),
    ("ln_final.weight", "text.ln_final.weight", false),
    ("ln_final.bias", "text.ln_final.bias", false),
    ("text_projection", "text.proj.weight", true),
    ("logit_scale", "loss.logit_scale", false),
    ("transformer.resblocks.{}.ln_1.weight", "text.block{}.ln1.weight", false),
    ("transformer.resblocks.{}.ln_1.bias", "text.block{}.ln1.bias", false),
    ("transformer.resblocks.{}.attn.in_proj_weight", "text.block{}.qkv.weight", false),
    ("transformer.resblocks.{}.attn.in_proj_bias", "text.block{}.qkv.bias", false),
    ("transformer.resblocks.{}.attn.out_proj.weight", "text.block{}.out.weight", false),
    ("transformer.resblocks.{}.attn.out_proj.bias", "text.block{}.out.bias", false),
    ("transformer.resblocks.{}.ln_2.weight", "text.block{}.ln2.weight", false),
    ("transformer.resblocks.{}.ln_2.bias", "text.block{}.ln2.bias", false),
    ("transformer.resblocks.{}.mlp.c_fc.weight", "text.block{}.fc1.weight", false),
    ("transformer.resblocks.{}.mlp.c_fc.bias", "text.block{}.fc1.bias", false),
    ("transformer.resblocks.{}.mlp.c_proj.weight", "text.block{}.fc2.weight", false),
    ("transformer.resblocks.{}.mlp.c_proj.bias", "text.block{}.fc2.bias", false),
];

/// The name here of an open_clip key, and whether it is transposed; `None` for
/// keys with no counterpart.
pub fn open_clip(key: &str) -> Option<(String, bool)> {
    TABLE.iter().find_map(|&(pattern, ours, transposed)| match pattern.split_once("{}") {
        None => (pattern == key).then(|| (ours.to_string(), transposed)),
        Some((head, tail)) => {
            let index = key.strip_prefix(head)?.strip_suffix(tail)?;
            index.parse::<usize>().ok().map(|i| (ours.replace("{}", &i.to_string()), transposed))
        }
    })
}
