//! Image augmentations for grayscale images (28×28 Fashion-MNIST for now).
//!
//! Conventions follow torchvision: `RandomResizedCrop` samples area and
//! log-aspect ratio with ten attempts and a centre-crop fallback, then resizes
//! bilinearly with half-pixel centres (`align_corners=False`); brightness and
//! contrast jitter are applied in random order and clamp to [0, 1]; contrast
//! blends with the image mean; the blur is a separable Gaussian with reflected
//! borders and radius ⌈3σ⌉. Output is normalised with the dataset mean/std.

use rand::seq::SliceRandom;
use rand::Rng;

/// Parameters of one augmentation preset.
#[derive(Debug, Clone, PartialEq)]
pub struct AugParams {
    /// Crop area fraction range; `None` disables cropping.
    pub crop_scale: Option<[f32; 2]>,
    /// Crop aspect-ratio range.
    pub crop_ratio: [f32; 2],
    /// Horizontal flip probability.
    pub flip_prob: f32,
    /// Probability of brightness/contrast jitter.
    pub jitter_prob: f32,
    /// Brightness strength.
    pub brightness: f32,
    /// Contrast strength.
    pub contrast: f32,
    /// Gaussian blur probability.
    pub blur_prob: f32,
    /// Blur sigma range in pixels.
    pub blur_sigma: [f32; 2],
    /// RandAugment's (N ops, magnitude M of 30) after the crop and flip, as on RGB views.
    pub randaugment: Option<(usize, u32)>,
    /// Normalisation mean and standard deviation.
    pub mean_std: (f32, f32),
}

impl AugParams {
    /// No augmentation: only normalisation (for evaluation).
    pub fn identity(mean_std: (f32, f32)) -> Self {
        Self {
            crop_scale: None,
            crop_ratio: [1.0, 1.0],
            flip_prob: 0.0,
            jitter_prob: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            blur_prob: 0.0,
            blur_sigma: [1.0, 1.0],
            randaugment: None,
            mean_std,
        }
    }
}

/// Applies [`AugParams`] to `u8` grayscale images of one size.
#[derive(Debug, Clone)]
pub struct Augmenter {
    /// The parameters.
    pub params: AugParams,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Output height (the crop is resized to it; a multi-crop small view is smaller than the input).
    pub out_height: usize,
    /// Output width.
    pub out_width: usize,
}

/// A crop window: top, left, height, width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Top row.
    pub top: usize,
    /// Left column.
    pub left: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
}

/// torchvision's `RandomResizedCrop.get_params`.
pub fn random_resized_crop<R: Rng>(
    rng: &mut R,
    height: usize,
    width: usize,
    scale: [f32; 2],
    ratio: [f32; 2],
) -> Window {
    let area = (height * width) as f32;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(scale[0]..=scale[1]);
        let aspect = if lr0 < lr1 { rng.gen_range(lr0..lr1).exp() } else { ratio[0] };
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.gen_range(0..=height - h);
            let left = rng.gen_range(0..=width - w);
            return Window { top, left, h, w };
        }
    }
    // Fallback: centre crop at the nearest allowed ratio.
    let in_ratio = width as f32 / height as f32;
    let (w, h) = if in_ratio < ratio[0] {
        (width, ((width as f32 / ratio[0]).round() as usize).max(1))
    } else if in_ratio > ratio[1] {
        (((height as f32 * ratio[1]).round() as usize).max(1), height)
    } else {
        (width, height)
    };
    Window { top: (height - h) / 2, left: (width - w) / 2, h, w }
}

/// Bilinear resize of a window of `src` (row-major `src_w` wide) into `out` (`oh × ow`),
/// half-pixel centres, edges clamped (torch `interpolate(..., align_corners=False)`).
pub fn resize_window(src: &[f32], src_w: usize, win: Window, out: &mut [f32], oh: usize, ow: usize) {
    let sy = win.h as f32 / oh as f32;
    let sx = win.w as f32 / ow as f32;
    for y in 0..oh {
        let fy = ((y as f32 + 0.5) * sy - 0.5).max(0.0);
        let y0 = (fy as usize).min(win.h - 1);
        let y1 = (y0 + 1).min(win.h - 1);
        let wy = fy - y0 as f32;
        for x in 0..ow {
            let fx = ((x as f32 + 0.5) * sx - 0.5).max(0.0);
            let x0 = (fx as usize).min(win.w - 1);
            let x1 = (x0 + 1).min(win.w - 1);
            let wx = fx - x0 as f32;
            let at = |yy: usize, xx: usize| src[(win.top + yy) * src_w + win.left + xx];
            let top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx;
            let bot = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx;
            out[y * ow + x] = top * (1.0 - wy) + bot * wy;
        }
    }
}

/// Separable Gaussian blur with reflected borders, radius ⌈3σ⌉, in place.
///
/// Each pass accumulates whole shifted rows (`out += k_j · shifted`), which the
/// compiler vectorises; only the border samples go through the reflection.
pub fn gaussian_blur(img: &mut [f32], h: usize, w: usize, sigma: f32) {
    let r = (3.0 * sigma).ceil().max(1.0) as usize;
    let mut k: Vec<f32> =
        (0..=2 * r).map(|i| (-((i as f32 - r as f32).powi(2)) / (2.0 * sigma * sigma)).exp()).collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        if n == 1 {
            return 0;
        }
        let mut i = i;
        while i < 0 || i >= n {
            i = if i < 0 { -i } else { 2 * (n - 1) - i };
        }
        i as usize
    };
    // Horizontal pass into `tmp`: a padded copy of each row, then shifted multiply-adds.
    let mut tmp = vec![0f32; h * w];
    let mut padded = vec![0f32; w + 2 * r];
    for y in 0..h {
        let row = &img[y * w..(y + 1) * w];
        for (p, v) in padded.iter_mut().enumerate() {
            *v = row[reflect(p as isize - r as isize, w)];
        }
        let out = &mut tmp[y * w..(y + 1) * w];
        for (j, &kj) in k.iter().enumerate() {
            for (o, v) in out.iter_mut().zip(&padded[j..j + w]) {
                *o += kj * v;
            }
        }
    }
    // Vertical pass: each output row is a weighted sum of whole (reflected) input rows.
    img.iter_mut().for_each(|v| *v = 0.0);
    for y in 0..h {
        let out = &mut img[y * w..(y + 1) * w];
        for (j, &kj) in k.iter().enumerate() {
            let src = reflect(y as isize + j as isize - r as isize, h);
            for (o, v) in out.iter_mut().zip(&tmp[src * w..(src + 1) * w]) {
                *o += kj * v;
            }
        }
    }
}

impl Augmenter {
    /// An augmenter of `height × width` images whose output has the input's size.
    pub fn new(params: AugParams, height: usize, width: usize) -> Self {
        Self { params, height, width, out_height: height, out_width: width }
    }

    /// The same augmenter with output `height × width` (the crop, or the whole image, is resized).
    pub fn resized(self, height: usize, width: usize) -> Self {
        Self { out_height: height, out_width: width, ..self }
    }

    /// Write one augmented, normalised view of `src` into `out` (`out_height × out_width`).
    pub fn apply<R: Rng>(&self, src: &[u8], rng: &mut R, out: &mut [f32]) {
        self.apply_with(src, rng, out, self.params.randaugment)
    }

    /// [`Augmenter::apply`] with RandAugment's (N, M) given (a schedule's, for this step).
    pub fn apply_with<R: Rng>(&self, src: &[u8], rng: &mut R, out: &mut [f32], randaugment: Option<(usize, u32)>) {
        let (h, w) = (self.height, self.width);
        let (oh, ow) = (self.out_height, self.out_width);
        let p = &self.params;
        let img: Vec<f32> = src.iter().map(|&v| v as f32 / 255.0).collect();
        match p.crop_scale {
            Some(scale) => {
                let win = random_resized_crop(rng, h, w, scale, p.crop_ratio);
                resize_window(&img, w, win, out, oh, ow);
            }
            None if (oh, ow) == (h, w) => out.copy_from_slice(&img),
            None => resize_window(&img, w, Window { top: 0, left: 0, h, w }, out, oh, ow),
        }
        let (h, w) = (oh, ow);
        if p.flip_prob > 0.0 && rng.gen::<f32>() < p.flip_prob {
            for row in out.chunks_mut(w) {
                row.reverse();
            }
        }
        if let Some((n, m)) = randaugment {
            crate::randaug::rand_augment(out, h, w, n, m, rng);
        }
        if p.jitter_prob > 0.0 && rng.gen::<f32>() < p.jitter_prob {
            let b = 1.0 + rng.gen_range(-p.brightness..=p.brightness);
            let c = 1.0 + rng.gen_range(-p.contrast..=p.contrast);
            let mut order = [0u8, 1];
            order.shuffle(rng);
            for op in order {
                if op == 0 {
                    out.iter_mut().for_each(|v| *v = (*v * b).clamp(0.0, 1.0));
                } else {
                    let mean = out.iter().sum::<f32>() / out.len() as f32;
                    out.iter_mut().for_each(|v| *v = (mean + c * (*v - mean)).clamp(0.0, 1.0));
                }
            }
        }
        if p.blur_prob > 0.0 && rng.gen::<f32>() < p.blur_prob {
            let sigma = rng.gen_range(p.blur_sigma[0]..=p.blur_sigma[1]);
            gaussian_blur(out, h, w, sigma);
        }
        let (m, s) = p.mean_std;
        out.iter_mut().for_each(|v| *v = (*v - m) / s);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;

    fn plain() -> AugParams {
        AugParams::identity((0.0, 1.0))
    }

    #[test]
    fn flip_mirrors_rows_of_a_known_image() {
        let aug = Augmenter::new(AugParams { flip_prob: 1.0, ..plain() }, 2, 3);
        let src = [0u8, 51, 102, 153, 204, 255];
        let mut out = [0f32; 6];
        aug.apply(&src, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0), &mut out);
        let want = [102u8, 51, 0, 255, 204, 153].map(|v| v as f32 / 255.0);
        assert_eq!(out, want);
    }

    #[test]
    fn a_smaller_output_resizes_the_whole_image() {
        // No crop, output 2×2 from 4×4: bilinear with half-pixel centres averages 2×2 blocks.
        let aug = Augmenter::new(plain(), 4, 4).resized(2, 2);
        let src: Vec<u8> = (0..16).map(|v| v * 10).collect();
        let mut out = [0f32; 4];
        aug.apply(&src, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0), &mut out);
        let want = [25.0f32, 45.0, 105.0, 125.0].map(|v| v / 255.0);
        assert!(out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{out:?}");
    }

    #[test]
    fn resize_of_full_window_is_identity_and_crop_picks_the_window() {
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let mut out = vec![0f32; 16];
        resize_window(&src, 4, Window { top: 0, left: 0, h: 4, w: 4 }, &mut out, 4, 4);
        assert_eq!(out, src);
        // A 2×2 window at (1,1) upsampled to 2×2 is that window exactly.
        let mut out = vec![0f32; 4];
        resize_window(&src, 4, Window { top: 1, left: 1, h: 2, w: 2 }, &mut out, 2, 2);
        assert_eq!(out, vec![5.0, 6.0, 9.0, 10.0]);
        // Downsampling 4→2 averages 2×2 blocks (half-pixel centres).
        let mut out = vec![0f32; 4];
        resize_window(&src, 4, Window { top: 0, left: 0, h: 4, w: 4 }, &mut out, 2, 2);
        assert_eq!(out, vec![2.5, 4.5, 10.5, 12.5]);
    }

    #[test]
    fn crops_stay_inside_and_respect_scale() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..500 {
            let win = random_resized_crop(&mut rng, 28, 28, [0.3, 1.0], [0.75, 4.0 / 3.0]);
            assert!(win.top + win.h <= 28 && win.left + win.w <= 28 && win.h > 0 && win.w > 0);
            let frac = (win.h * win.w) as f32 / 784.0;
            assert!((0.25..=1.0).contains(&frac), "{frac}");
        }
    }

    #[test]
    fn blur_keeps_constant_images_and_mass() {
        let mut img = vec![0.5f32; 25];
        gaussian_blur(&mut img, 5, 5, 1.0);
        assert!(img.iter().all(|v| (v - 0.5).abs() < 1e-6));
        // An impulse far from the borders keeps its mass and spreads symmetrically.
        let mut img = vec![0f32; 225];
        img[112] = 1.0;
        gaussian_blur(&mut img, 15, 15, 0.8);
        assert!((img.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert!(img[112] < 1.0 && img[112] > img[111] && (img[111] - img[113]).abs() < 1e-7);
    }

    /// Every op on (crop, flip, jitter, blur), unnormalised; the pipeline tests use it too.
    pub(crate) fn all_ops() -> AugParams {
        AugParams {
            crop_scale: Some([0.3, 1.0]),
            crop_ratio: [0.75, 1.333],
            flip_prob: 0.5,
            jitter_prob: 1.0,
            brightness: 0.4,
            contrast: 0.4,
            blur_prob: 0.5,
            blur_sigma: [0.1, 1.0],
            randaugment: None,
            mean_std: (0.0, 1.0),
        }
    }

    #[test]
    fn grayscale_views_take_randaugment_after_the_crop_and_flip() {
        let src: Vec<u8> = (0..784).map(|i| (i * 7 % 256) as u8).collect();
        let view = |params: AugParams, seed| {
            let mut out = vec![0f32; 784];
            Augmenter::new(params, 28, 28).apply(&src, &mut crate::rng::sample_rng(seed, 0, 5, 100), &mut out);
            out
        };
        let ra = AugParams { randaugment: Some((2, 15)), ..plain() };
        assert_eq!(view(ra.clone(), 3), view(ra.clone(), 3), "keyed on the stream");
        let changed = (0..20).filter(|&s| view(ra.clone(), s) != view(plain(), s)).count();
        assert!(changed >= 15, "two ops of 14 leave the image as it was only by Identity: {changed}/20 changed");
        assert!((0..20).all(|s| view(ra.clone(), s).iter().all(|v| (0.0..=1.0).contains(v))));
        // The ops draw from the view's stream after the crop and flip: those stay where they were.
        let crop = AugParams { crop_scale: Some([0.3, 1.0]), flip_prob: 0.5, ..plain() };
        let n0 = AugParams { randaugment: Some((0, 15)), ..crop.clone() };
        assert_eq!(view(n0, 7), view(crop, 7), "N = 0 draws nothing");
    }

    #[test]
    fn full_preset_is_deterministic_and_in_range() {
        let aug = Augmenter::new(all_ops(), 28, 28);
        let src: Vec<u8> = (0..784).map(|i| (i * 7 % 256) as u8).collect();
        let run = |seed| {
            let mut out = vec![0f32; 784];
            aug.apply(&src, &mut crate::rng::sample_rng(seed, 0, 5, 100), &mut out);
            out
        };
        let (a, b, c) = (run(1), run(1), run(2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}
