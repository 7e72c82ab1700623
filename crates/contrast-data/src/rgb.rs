//! Decoding and colour augmentation of RGB images (JPEG, PNG, WebP; grayscale
//! and RGBA are converted to RGB).
//!
//! Conventions follow torchvision: `RandomResizedCrop` (see [`crate::augment`])
//! then a bilinear resize of the crop (SIMD, `fast_image_resize`), horizontal
//! flip, `ColorJitter` (brightness, contrast, saturation, hue in a random order;
//! contrast and saturation blend with the ITU-R 601 grey image, hue rotates in
//! HSV), `RandomGrayscale`, Gaussian blur, solarisation (x ≥ threshold → 1 − x),
//! and per-channel normalisation. Output is CHW `f32`.

use crate::augment::{gaussian_blur, random_resized_crop, Window};
use fast_image_resize as fir;
use rand::seq::SliceRandom;
use rand::Rng;

/// A decoded image: HWC, 3 × u8 per pixel.
#[derive(Debug, Clone)]
pub struct Rgb {
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Pixels, row major, RGB.
    pub data: Vec<u8>,
}

/// Decode JPEG, PNG or WebP bytes into RGB (any colour type is converted).
/// An image whose header declares more than `data.max_image_pixels` pixels is
/// refused before decoding ([`crate::limits`]).
pub fn decode(bytes: &[u8]) -> Result<Rgb, String> {
    crate::limits::check_pixels(bytes, crate::limits::get().pixels)?;
    let img = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
    let rgb = img.into_rgb8();
    let (width, height) = rgb.dimensions();
    if width == 0 || height == 0 {
        return Err("image has no pixels".into());
    }
    Ok(Rgb { width, height, data: rgb.into_raw() })
}

/// Parameters of an RGB augmentation preset.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbAugParams {
    /// Output side (square crops).
    pub size: u32,
    /// Random resized crop scale range; `None` = resize the shorter side and centre-crop.
    pub crop_scale: Option<[f32; 2]>,
    /// Crop aspect-ratio range.
    pub crop_ratio: [f32; 2],
    /// Horizontal flip probability.
    pub flip_prob: f32,
    /// Probability of colour jitter.
    pub jitter_prob: f32,
    /// Brightness, contrast, saturation strengths and hue (≤ 0.5).
    pub jitter: [f32; 4],
    /// Random grayscale probability.
    pub gray_prob: f32,
    /// Gaussian blur probability.
    pub blur_prob: f32,
    /// Blur sigma range, as a fraction of the output side (SimCLR: 0.1–2.0 px at 224 ≈ kernel 10 %).
    pub blur_sigma: [f32; 2],
    /// Solarisation probability.
    pub solarize_prob: f32,
    /// RandAugment (N ops, magnitude M of 30) after the crop and flip; `None` = off.
    pub randaugment: Option<(usize, u32)>,
    /// The ImageNet AutoAugment policy after the crop and flip.
    pub autoaugment: bool,
    /// Per-channel mean and std.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

/// ImageNet statistics, torchvision's defaults.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// SwAV's crop-area range of the two large views.
pub const SWAV_LARGE_SCALE: [f32; 2] = [0.14, 1.0];
/// SwAV's crop-area range of the small views.
pub const SWAV_SMALL_SCALE: [f32; 2] = [0.05, 0.14];

/// Default side of multi-crop small views for views of side `size`: SwAV's
/// 96 px at 224, i.e. ⌈size · 96 / 224⌉, at least 8.
pub fn small_crop_side(size: u32) -> u32 {
    (size * 96).div_ceil(224).max(8)
}

impl RgbAugParams {
    /// SimCLR's augmentation (Chen et al. 2020, appendix A) at `size`.
    pub fn simclr(size: u32) -> Self {
        Self {
            size,
            crop_scale: Some([0.08, 1.0]),
            crop_ratio: [0.75, 4.0 / 3.0],
            flip_prob: 0.5,
            jitter_prob: 0.8,
            jitter: [0.8, 0.8, 0.8, 0.2],
            gray_prob: 0.2,
            blur_prob: 0.5,
            blur_sigma: [0.1, 2.0],
            solarize_prob: 0.0,
            randaugment: None,
            autoaugment: false,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// MoCo v2's augmentation (`aug_plus` of the MoCo reference): crops 0.2–1,
    /// jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, blur p 0.5, flip.
    pub fn mocov2(size: u32) -> Self {
        Self { crop_scale: Some([0.2, 1.0]), jitter: [0.4, 0.4, 0.4, 0.1], ..Self::simclr(size) }
    }

    /// BYOL's two asymmetric views (Grill et al. 2020, table 6): jitter
    /// (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2; blur p 1.0 / 0.1, solarise p 0 / 0.2.
    pub fn byol(size: u32) -> [Self; 2] {
        let base = Self { jitter: [0.4, 0.4, 0.2, 0.1], ..Self::simclr(size) };
        [
            Self { blur_prob: 1.0, solarize_prob: 0.0, ..base.clone() },
            Self { blur_prob: 0.1, solarize_prob: 0.2, ..base },
        ]
    }

    /// SwAV's multi-crop: 2 views at `size` (crops [`SWAV_LARGE_SCALE`]) and `small` views at
    /// `small_size` (crops [`SWAV_SMALL_SCALE`]), SimCLR colour distortion on all.
    pub fn swav(size: u32, small_size: u32, small: usize) -> Vec<Self> {
        let large = Self { crop_scale: Some(SWAV_LARGE_SCALE), ..Self::simclr(size) };
        let little = Self { crop_scale: Some(SWAV_SMALL_SCALE), ..Self::simclr(small_size) };
        let mut v = vec![large.clone(), large];
        v.extend(std::iter::repeat_n(little, small));
        v
    }

    /// The views of a named preset: `simclr`, `mocov2`, `byol`, `swav`, `clip`.
    pub fn preset(name: &str, size: u32, small_size: u32, small: usize) -> Option<Vec<Self>> {
        Some(match name {
            "simclr" => vec![Self::simclr(size); 2],
            "mocov2" => vec![Self::mocov2(size); 2],
            "byol" => Self::byol(size).to_vec(),
            "swav" => Self::swav(size, small_size, small),
            "clip" => vec![Self::clip(size)],
            _ => return None,
        })
    }

    /// CLIP's evaluation transform: resize the shorter side, centre crop, normalise (OpenAI CLIP statistics).
    pub fn clip(size: u32) -> Self {
        Self {
            size,
            crop_scale: None,
            crop_ratio: [1.0, 1.0],
            flip_prob: 0.0,
            jitter_prob: 0.0,
            jitter: [0.0; 4],
            gray_prob: 0.0,
            blur_prob: 0.0,
            blur_sigma: [0.1, 2.0],
            solarize_prob: 0.0,
            randaugment: None,
            autoaugment: false,
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }
}

/// Applies [`RgbAugParams`]; one per worker (it owns a resizer).
pub struct RgbAugmenter {
    /// The parameters.
    pub params: RgbAugParams,
    resizer: fir::Resizer,
    /// The resized crop (`size × size × 3` bytes), reused from view to view.
    crop: Vec<u8>,
}

impl Clone for RgbAugmenter {
    fn clone(&self) -> Self {
        Self::new(self.params.clone())
    }
}

impl std::fmt::Debug for RgbAugmenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RgbAugmenter").field("params", &self.params).finish()
    }
}

fn gray(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

fn rotate_hue(px: [f32; 3], shift: f32) -> [f32; 3] {
    let [r, g, b] = px;
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let v = max;
    let c = max - min;
    if c <= 0.0 {
        return px;
    }
    let s = c / max;
    let mut h = if max == r {
        ((g - b) / c).rem_euclid(6.0)
    } else if max == g {
        (b - r) / c + 2.0
    } else {
        (r - g) / c + 4.0
    } / 6.0;
    h = (h + shift).rem_euclid(1.0);
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match i as i32 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

impl RgbAugmenter {
    /// An augmenter for `params`.
    pub fn new(params: RgbAugParams) -> Self {
        let side = params.size as usize;
        Self { params, resizer: fir::Resizer::new(), crop: vec![0; side * side * 3] }
    }

    /// The (random resized, or centre) crop of `src` at `size`, flipped with
    /// `flip_prob`, as CHW floats in [0, 1].
    fn crop_flip<R: Rng>(&mut self, src: &Rgb, rng: &mut R, out: &mut [f32]) -> Result<(), String> {
        let p = &self.params;
        let size = p.size as usize;
        let (w, h) = (src.width as usize, src.height as usize);
        let win = match p.crop_scale {
            Some(scale) => random_resized_crop(rng, h, w, scale, p.crop_ratio),
            None => {
                let side = w.min(h);
                Window { top: (h - side) / 2, left: (w - side) / 2, h: side, w: side }
            }
        };
        let src_img = fir::images::ImageRef::new(src.width, src.height, &src.data, fir::PixelType::U8x3)
            .map_err(|e| format!("image buffer: {e:?}"))?;
        let mut dst = fir::images::Image::from_slice_u8(p.size, p.size, &mut self.crop, fir::PixelType::U8x3)
            .map_err(|e| format!("crop buffer: {e:?}"))?;
        let opts = fir::ResizeOptions::new().resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear)).crop(
            win.left as f64,
            win.top as f64,
            win.w as f64,
            win.h as f64,
        );
        self.resizer.resize(&src_img, &mut dst, &opts).map_err(|e| format!("resize: {e:?}"))?;
        let bytes = dst.buffer();
        let plane = size * size;
        let flip = p.flip_prob > 0.0 && rng.gen::<f32>() < p.flip_prob;
        for y in 0..size {
            for x in 0..size {
                let sx = if flip { size - 1 - x } else { x };
                let s = (y * size + sx) * 3;
                for c in 0..3 {
                    out[c * plane + y * size + x] = bytes[s + c] as f32 / 255.0;
                }
            }
        }
        Ok(())
    }

    /// Write one augmented CHW view of `src` into `out` (`3 × size × size`).
    pub fn apply<R: Rng>(&mut self, src: &Rgb, rng: &mut R, out: &mut [f32]) -> Result<(), String> {
        let p = self.params.clone();
        let size = p.size as usize;
        let plane = size * size;
        self.crop_flip(src, rng, out)?;
        if p.autoaugment {
            crate::randaug::auto_augment(out, size, size, rng);
        }
        if let Some((n, m)) = p.randaugment {
            crate::randaug::rand_augment(out, size, size, n, m, rng);
        }
        if p.jitter_prob > 0.0 && rng.gen::<f32>() < p.jitter_prob {
            color_jitter(out, plane, p.jitter, rng);
        }
        if p.gray_prob > 0.0 && rng.gen::<f32>() < p.gray_prob {
            for i in 0..plane {
                let g = gray(out[i], out[plane + i], out[2 * plane + i]);
                (0..3).for_each(|c| out[c * plane + i] = g);
            }
        }
        if p.blur_prob > 0.0 && rng.gen::<f32>() < p.blur_prob {
            let sigma = rng.gen_range(p.blur_sigma[0]..=p.blur_sigma[1]) * size as f32 / 224.0;
            for c in 0..3 {
                gaussian_blur(&mut out[c * plane..(c + 1) * plane], size, size, sigma.max(0.05));
            }
        }
        if p.solarize_prob > 0.0 && rng.gen::<f32>() < p.solarize_prob {
            out.iter_mut().for_each(|v| {
                if *v >= 0.5 {
                    *v = 1.0 - *v
                }
            });
        }
        for c in 0..3 {
            let (m, s) = (p.mean[c], p.std[c]);
            out[c * plane..(c + 1) * plane].iter_mut().for_each(|v| *v = (*v - m) / s);
        }
        Ok(())
    }
}

/// torchvision's `ColorJitter`: brightness, contrast, saturation and hue
/// factors drawn from `jitter`, applied in a random order.
fn color_jitter<R: Rng>(out: &mut [f32], plane: usize, jitter: [f32; 4], rng: &mut R) {
    let [bs, cs, ss, hs] = jitter;
    let mut factor = |s: f32| if s > 0.0 { rng.gen_range((1.0 - s).max(0.0)..=1.0 + s) } else { 1.0 };
    let (bf, cf, sf) = (factor(bs), factor(cs), factor(ss));
    let hf = if hs > 0.0 { rng.gen_range(-hs..=hs) } else { 0.0 };
    let mut order = [0u8, 1, 2, 3];
    order.shuffle(rng);
    for op in order {
        match op {
            0 => out.iter_mut().for_each(|v| *v = (*v * bf).clamp(0.0, 1.0)),
            1 => {
                let mean =
                    (0..plane).map(|i| gray(out[i], out[plane + i], out[2 * plane + i])).sum::<f32>() / plane as f32;
                out.iter_mut().for_each(|v| *v = (cf * *v + (1.0 - cf) * mean).clamp(0.0, 1.0));
            }
            2 => {
                for i in 0..plane {
                    let g = gray(out[i], out[plane + i], out[2 * plane + i]);
                    for c in 0..3 {
                        let v = &mut out[c * plane + i];
                        *v = (sf * *v + (1.0 - sf) * g).clamp(0.0, 1.0);
                    }
                }
            }
            _ if hf != 0.0 => {
                for i in 0..plane {
                    let px = rotate_hue([out[i], out[plane + i], out[2 * plane + i]], hf);
                    for c in 0..3 {
                        out[c * plane + i] = px[c];
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn plain(size: u32) -> RgbAugParams {
        RgbAugParams { mean: [0.0; 3], std: [1.0; 3], ..RgbAugParams::clip(size) }
    }

    #[test]
    fn decodes_png_gray_and_rgba_to_rgb() {
        let rgb = decode(&png(3, 2, |x, y| [x as u8 * 10, y as u8 * 20, 7])).unwrap();
        assert_eq!((rgb.width, rgb.height), (3, 2));
        assert_eq!(&rgb.data[..6], &[0, 0, 7, 10, 0, 7]);
        let g = image::GrayImage::from_fn(2, 2, |x, _| image::Luma([x as u8 * 100]));
        let mut buf = std::io::Cursor::new(Vec::new());
        g.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        assert_eq!(decode(&buf.into_inner()).unwrap().data, vec![0, 0, 0, 100, 100, 100, 0, 0, 0, 100, 100, 100]);
        let a = image::RgbaImage::from_fn(1, 1, |_, _| image::Rgba([1, 2, 3, 4]));
        let mut buf = std::io::Cursor::new(Vec::new());
        a.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        assert_eq!(decode(&buf.into_inner()).unwrap().data, vec![1, 2, 3]);
        assert!(decode(b"not an image").is_err());
    }

    #[test]
    fn centre_crop_resize_and_flip_on_a_known_image() {
        // 4×2 image: the centre square is columns 1..3.
        let src = decode(&png(4, 2, |x, _| [x as u8 * 50, 0, 0])).unwrap();
        let mut aug = RgbAugmenter::new(plain(2));
        let mut out = vec![0f32; 12];
        aug.apply(&src, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0), &mut out).unwrap();
        assert_eq!(&out[..4], &[50.0 / 255.0, 100.0 / 255.0, 50.0 / 255.0, 100.0 / 255.0]);
        let mut aug = RgbAugmenter::new(RgbAugParams { flip_prob: 1.0, ..plain(2) });
        aug.apply(&src, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0), &mut out).unwrap();
        assert_eq!(&out[..2], &[100.0 / 255.0, 50.0 / 255.0]);
    }

    #[test]
    fn colour_ops_keep_range_and_grayscale_equalises_channels() {
        let src = decode(&png(40, 30, |x, y| [(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8])).unwrap();
        let p = RgbAugParams { gray_prob: 1.0, mean: [0.0; 3], std: [1.0; 3], ..RgbAugParams::simclr(16) };
        let mut aug = RgbAugmenter::new(p);
        let mut out = vec![0f32; 3 * 256];
        aug.apply(&src, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1), &mut out).unwrap();
        assert!(out.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!((0..256).all(|i| out[i] == out[256 + i] && out[i] == out[512 + i]));
        // Hue rotation by a full turn is the identity; by 1/3 it cycles the channels of a pure colour.
        let px = rotate_hue([0.9, 0.2, 0.1], 1.0);
        assert!((px[0] - 0.9).abs() < 1e-6 && (px[1] - 0.2).abs() < 1e-6);
        let px = rotate_hue([1.0, 0.0, 0.0], 1.0 / 3.0);
        assert!((px[1] - 1.0).abs() < 1e-5 && px[0].abs() < 1e-5);
    }

    #[test]
    fn presets_follow_their_papers() {
        let byol = RgbAugParams::byol(32);
        assert_eq!(
            (byol[0].blur_prob, byol[0].solarize_prob, byol[1].blur_prob, byol[1].solarize_prob),
            (1.0, 0.0, 0.1, 0.2)
        );
        let swav = RgbAugParams::preset("swav", 32, 16, 4).unwrap();
        assert_eq!(swav.iter().map(|p| p.size).collect::<Vec<_>>(), vec![32, 32, 16, 16, 16, 16]);
        assert_eq!(swav[2].crop_scale, Some([0.05, 0.14]));
        assert_eq!(RgbAugParams::preset("mocov2", 32, 16, 0).unwrap()[0].crop_scale, Some([0.2, 1.0]));
        assert!(RgbAugParams::preset("nope", 32, 16, 0).is_none());
    }

    #[test]
    fn same_key_same_bytes() {
        let src = decode(&png(50, 40, |x, y| [(x * 5) as u8, (y * 6) as u8, 90])).unwrap();
        let run = |seed| {
            let mut aug = RgbAugmenter::new(RgbAugParams { solarize_prob: 0.5, ..RgbAugParams::simclr(24) });
            let mut out = vec![0f32; 3 * 24 * 24];
            aug.apply(&src, &mut crate::rng::sample_rng(seed, 1, 2, 100), &mut out).unwrap();
            out
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }
}
