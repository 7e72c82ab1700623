//! RandAugment (Cubuk et al. 2020) and an AutoAugment-style fixed policy
//! (Cubuk et al. 2019, torchvision's ImageNet policy) on CHW `f32` images in
//! [0, 1] of 3 channels or 1 (grayscale, where Color is the identity, as PIL's
//! on an `L` image, and the gray level is the pixel itself); RandAugment follows
//! torchvision's `RandAugment(num_ops, magnitude, num_magnitude_bins=31)`:
//! N ops drawn uniformly (with replacement) from Identity, ShearX/Y,
//! TranslateX/Y, Rotate, Brightness, Color, Contrast, Sharpness, Posterize,
//! Solarize, AutoContrast and Equalize; signed magnitudes flip sign with
//! probability ½; geometric ops use nearest-neighbour sampling and fill 0.
//! Magnitude m of 31 bins maps to: shear 0.3·m/30, translate (150/331)·W·m/30
//! pixels, rotation 30°·m/30, enhance factors 1 ± 0.9·m/30, posterize
//! 8 − round(m/7.5) bits, solarise threshold 1 − m/30.

use rand::Rng;

const BINS: f32 = 30.0;

/// The gray level of pixel `i` (ITU-R 601-2 luma for RGB, as PIL's `L` conversion; the pixel for one channel).
fn gray(img: &[f32], plane: usize, i: usize) -> f32 {
    match img.len() / plane {
        1 => img[i],
        _ => 0.299 * img[i] + 0.587 * img[plane + i] + 0.114 * img[2 * plane + i],
    }
}

/// Inverse-map every output pixel through `f(x, y) -> (sx, sy)` (nearest, fill 0).
fn warp(img: &mut [f32], h: usize, w: usize, f: impl Fn(f32, f32) -> (f32, f32)) {
    let src = img.to_vec();
    let plane = h * w;
    for y in 0..h {
        for x in 0..w {
            let (sx, sy) = f(x as f32 + 0.5, y as f32 + 0.5);
            let (ix, iy) = ((sx - 0.5).round(), (sy - 0.5).round());
            let inside = ix >= 0.0 && iy >= 0.0 && (ix as usize) < w && (iy as usize) < h;
            for c in 0..img.len() / plane {
                img[c * plane + y * w + x] = if inside { src[c * plane + iy as usize * w + ix as usize] } else { 0.0 };
            }
        }
    }
}

fn blend(img: &mut [f32], other: &[f32], factor: f32) {
    for (v, o) in img.iter_mut().zip(other) {
        *v = (o + factor * (*v - o)).clamp(0.0, 1.0);
    }
}

/// Apply one op (index into the op list) at `magnitude` (0..=30).
pub fn apply_op(img: &mut [f32], h: usize, w: usize, op: usize, magnitude: f32, sign: f32) {
    let plane = h * w;
    let m = magnitude / BINS;
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    match op {
        0 => {} // Identity
        1 => {
            let s = 0.3 * m * sign;
            warp(img, h, w, |x, y| (x + s * (y - cy), y)); // ShearX
        }
        2 => {
            let s = 0.3 * m * sign;
            warp(img, h, w, |x, y| (x, y + s * (x - cx))); // ShearY
        }
        3 => {
            let t = 150.0 / 331.0 * w as f32 * m * sign;
            warp(img, h, w, |x, y| (x - t, y)); // TranslateX
        }
        4 => {
            let t = 150.0 / 331.0 * h as f32 * m * sign;
            warp(img, h, w, |x, y| (x, y - t)); // TranslateY
        }
        5 => {
            let a = (30.0 * m * sign).to_radians();
            let (s, c) = a.sin_cos();
            warp(img, h, w, |x, y| {
                let (dx, dy) = (x - cx, y - cy);
                (cx + c * dx - s * dy, cy + s * dx + c * dy)
            }); // Rotate
        }
        6 => img.iter_mut().for_each(|v| *v = (*v * (1.0 + 0.9 * m * sign)).clamp(0.0, 1.0)), // Brightness
        7 => {
            let channels = img.len() / plane;
            let g: Vec<f32> =
                (0..channels).flat_map(|_| (0..plane).map(|i| gray(img, plane, i)).collect::<Vec<_>>()).collect();
            blend(img, &g, 1.0 + 0.9 * m * sign); // Color (saturation; the identity on one channel)
        }
        8 => {
            let mean = (0..plane).map(|i| gray(img, plane, i)).sum::<f32>() / plane as f32;
            let g = vec![mean; img.len()];
            blend(img, &g, 1.0 + 0.9 * m * sign); // Contrast
        }
        9 => blend(img, &smoothed(img, h, w), 1.0 + 0.9 * m * sign), // Sharpness
        10 => {
            let bits = 8 - (magnitude / 7.5).round() as u32;
            let mask = !((1u32 << (8 - bits.min(8))) - 1) as u8;
            img.iter_mut().for_each(|v| *v = ((*v * 255.0).round() as u8 & mask) as f32 / 255.0);
            // Posterize
        }
        11 => {
            let threshold = 1.0 - m;
            img.iter_mut().for_each(|v| {
                if *v >= threshold {
                    *v = 1.0 - *v
                }
            }); // Solarize
        }
        12 => {
            for c in 0..img.len() / plane {
                let ch = &mut img[c * plane..(c + 1) * plane];
                let (lo, hi) = ch.iter().fold((1f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
                if hi > lo {
                    ch.iter_mut().for_each(|v| *v = (*v - lo) / (hi - lo));
                }
            } // AutoContrast
        }
        14 => img.iter_mut().for_each(|v| *v = 1.0 - *v), // Invert (AutoAugment only)
        _ => (0..img.len() / plane).for_each(|c| equalize(&mut img[c * plane..(c + 1) * plane])), // Equalize
    }
}

/// The 3×3 smoothed image PIL's Sharpness blends with (kernel 1 1 1 / 1 5 1 / 1 1 1, borders kept).
fn smoothed(img: &[f32], h: usize, w: usize) -> Vec<f32> {
    let plane = h * w;
    let mut smooth = img.to_vec();
    for c in 0..img.len() / plane {
        for y in 1..h.saturating_sub(1) {
            for x in 1..w.saturating_sub(1) {
                let mut acc = 4.0 * img[c * plane + y * w + x];
                for dy in 0..3 {
                    for dx in 0..3 {
                        acc += img[c * plane + (y + dy - 1) * w + x + dx - 1];
                    }
                }
                smooth[c * plane + y * w + x] = acc / 13.0;
            }
        }
    }
    smooth
}

/// Histogram equalisation of one channel (PIL's `ImageOps.equalize` on 256 levels).
fn equalize(ch: &mut [f32]) {
    let plane = ch.len();
    let q: Vec<usize> = ch.iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as usize).collect();
    let mut hist = [0usize; 256];
    q.iter().for_each(|&v| hist[v] += 1);
    let mut cdf = [0usize; 256];
    let mut acc = 0;
    for (i, n) in hist.iter().enumerate() {
        acc += n;
        cdf[i] = acc;
    }
    let min = cdf.iter().copied().find(|&c| c > 0).unwrap_or(0);
    if plane > min {
        for (v, &qi) in ch.iter_mut().zip(&q) {
            *v = ((cdf[qi] - min) as f32 / (plane - min) as f32).clamp(0.0, 1.0);
        }
    }
}

/// Number of ops in the RandAugment list.
pub const OPS: usize = 14;

/// Apply `n` random ops at magnitude `m` (0..=30).
pub fn rand_augment<R: Rng>(img: &mut [f32], h: usize, w: usize, n: usize, m: u32, rng: &mut R) {
    for _ in 0..n {
        let op = rng.gen_range(0..OPS);
        let sign = if rng.gen::<bool>() { -1.0 } else { 1.0 };
        apply_op(img, h, w, op, m.min(30) as f32, sign);
    }
}

// Op indices of `apply_op`.
const SHEAR_X: usize = 1;
const ROTATE: usize = 5;
const COLOR: usize = 7;
const CONTRAST: usize = 8;
const SHARPNESS: usize = 9;
const POSTERIZE: usize = 10;
const SOLARIZE: usize = 11;
const AUTOCONTRAST: usize = 12;
const EQUALIZE: usize = 13;
const INVERT: usize = 14;

/// torchvision's `AutoAugmentPolicy.IMAGENET`: 25 sub-policies of two
/// (op, probability, magnitude bin of 10) steps.
const IMAGENET_POLICY: [[(usize, f32, u32); 2]; 25] = [
    [(POSTERIZE, 0.4, 8), (ROTATE, 0.6, 9)],
    [(SOLARIZE, 0.6, 5), (AUTOCONTRAST, 0.6, 0)],
    [(EQUALIZE, 0.8, 0), (EQUALIZE, 0.6, 0)],
    [(POSTERIZE, 0.6, 7), (POSTERIZE, 0.6, 6)],
    [(EQUALIZE, 0.4, 0), (SOLARIZE, 0.2, 4)],
    [(EQUALIZE, 0.4, 0), (ROTATE, 0.8, 8)],
    [(SOLARIZE, 0.6, 3), (EQUALIZE, 0.6, 0)],
    [(POSTERIZE, 0.8, 5), (EQUALIZE, 1.0, 0)],
    [(ROTATE, 0.2, 3), (SOLARIZE, 0.6, 8)],
    [(EQUALIZE, 0.6, 0), (POSTERIZE, 0.4, 6)],
    [(ROTATE, 0.8, 8), (COLOR, 0.4, 0)],
    [(ROTATE, 0.4, 9), (EQUALIZE, 0.6, 0)],
    [(EQUALIZE, 0.0, 0), (EQUALIZE, 0.8, 0)],
    [(INVERT, 0.6, 0), (EQUALIZE, 1.0, 0)],
    [(COLOR, 0.6, 4), (CONTRAST, 1.0, 8)],
    [(ROTATE, 0.8, 8), (COLOR, 1.0, 2)],
    [(COLOR, 0.8, 8), (SOLARIZE, 0.8, 7)],
    [(SHARPNESS, 0.4, 7), (INVERT, 0.6, 0)],
    [(SHEAR_X, 0.6, 5), (EQUALIZE, 1.0, 0)],
    [(COLOR, 0.4, 0), (EQUALIZE, 0.6, 0)],
    [(EQUALIZE, 0.4, 0), (SOLARIZE, 0.2, 4)],
    [(SOLARIZE, 0.6, 5), (AUTOCONTRAST, 0.6, 0)],
    [(INVERT, 0.6, 0), (EQUALIZE, 1.0, 0)],
    [(COLOR, 0.4, 0), (CONTRAST, 1.0, 8)],
    [(EQUALIZE, 0.8, 0), (EQUALIZE, 0.6, 0)],
];

/// Apply one random sub-policy of the ImageNet AutoAugment policy. A bin b of
/// 10 is magnitude 30·b/9 on RandAugment's scale (the same linspace end points).
pub fn auto_augment<R: Rng>(img: &mut [f32], h: usize, w: usize, rng: &mut R) {
    let policy = &IMAGENET_POLICY[rng.gen_range(0..IMAGENET_POLICY.len())];
    for &(op, p, bin) in policy {
        let sign = if rng.gen::<bool>() { -1.0 } else { 1.0 };
        if rng.gen::<f32>() < p {
            apply_op(img, h, w, op, 30.0 * bin as f32 / 9.0, sign);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(h: usize, w: usize) -> Vec<f32> {
        (0..3 * h * w).map(|i| (i % (h * w)) as f32 / (h * w) as f32).collect()
    }

    #[test]
    fn identity_and_zero_magnitude_keep_the_image() {
        let img = ramp(6, 6);
        for op in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] {
            let mut x = img.clone();
            apply_op(&mut x, 6, 6, op, 0.0, 1.0);
            assert!(x.iter().zip(&img).all(|(a, b)| (a - b).abs() < 1e-6), "op {op} at magnitude 0 changed the image");
        }
    }

    #[test]
    fn ops_do_what_they_say_on_known_images() {
        // TranslateX by a whole number of pixels shifts columns and fills 0.
        let (h, w) = (4, 331);
        let mut x: Vec<f32> = (0..3 * h * w).map(|i| ((i % w) as f32 + 1.0) / 1000.0).collect();
        apply_op(&mut x, h, w, 3, 30.0 * (1.0 / 150.0), 1.0); // shift by 1 px
        assert_eq!(x[0], 0.0);
        assert!((x[1] - 1.0 / 1000.0).abs() < 1e-6);
        // A 30° rotation about the centre keeps the centre pixel of an odd-sized image.
        let mut r = ramp(5, 5);
        let centre = r[12];
        apply_op(&mut r, 5, 5, 5, 30.0, 1.0);
        assert_eq!(r[12], centre);
        // Solarise at full magnitude inverts everything; posterize at m=30 keeps 4 bits.
        let mut s = vec![0.2f32, 0.8, 0.5];
        s.resize(3, 0.0);
        apply_op(&mut s, 1, 1, 11, 30.0, 1.0);
        assert!((s[0] - 0.8).abs() < 1e-6 && (s[1] - 0.2).abs() < 1e-6);
        let mut p = vec![200.0 / 255.0; 3];
        apply_op(&mut p, 1, 1, 10, 30.0, 1.0);
        assert_eq!((p[0] * 255.0).round() as u8, 200 & 0xF0);
        // AutoContrast stretches each channel to [0, 1]; Equalize spreads a two-level image.
        let mut a: Vec<f32> = vec![0.4, 0.6, 0.4, 0.6, 0.1, 0.2, 0.1, 0.2, 0.5, 0.5, 0.5, 0.5];
        apply_op(&mut a, 2, 2, 12, 0.0, 1.0);
        assert_eq!(&a[..4], &[0.0, 1.0, 0.0, 1.0]);
        assert_eq!(&a[8..], &[0.5; 4]);
        let mut e: Vec<f32> = vec![0.4, 0.4, 0.6, 0.6].repeat(3);
        apply_op(&mut e, 2, 2, 13, 0.0, 1.0);
        assert_eq!(&e[..4], &[0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn auto_augment_applies_policy_ops_and_invert() {
        let img = ramp(8, 8);
        let mut inv = img.clone();
        apply_op(&mut inv, 8, 8, INVERT, 0.0, 1.0);
        assert!(inv.iter().zip(&img).all(|(a, b)| (a + b - 1.0).abs() < 1e-6));
        let mut changed = 0;
        for seed in 0..20 {
            let mut x = img.clone();
            auto_augment(&mut x, 8, 8, &mut crate::rng::sample_rng(seed, 0, 0, 9));
            assert!(x.iter().all(|v| (0.0..=1.0).contains(v)));
            changed += usize::from(x != img);
        }
        assert!(changed > 10, "most draws change the image ({changed}/20)");
    }

    #[test]
    fn ops_work_on_one_channel_as_on_each_channel_of_three() {
        // A gray RGB image (three equal planes) and its one plane give the same plane under every op.
        let one: Vec<f32> = (0..36).map(|i| ((i * 7) % 36) as f32 / 36.0).collect();
        for op in 0..=INVERT {
            for m in [0.0, 9.0, 30.0] {
                let (mut a, mut b) = (one.clone(), one.repeat(3));
                apply_op(&mut a, 6, 6, op, m, 1.0);
                apply_op(&mut b, 6, 6, op, m, 1.0);
                assert!(a.iter().zip(&b[..36]).all(|(x, y)| (x - y).abs() < 1e-6), "op {op} at {m}");
                assert!(a.iter().all(|v| (0.0..=1.0).contains(v)), "op {op} at {m}");
            }
        }
        let mut x = one.clone();
        rand_augment(&mut x, 6, 6, 3, 15, &mut crate::rng::sample_rng(4, 0, 1, 3));
        let mut y = one.clone();
        rand_augment(&mut y, 6, 6, 3, 15, &mut crate::rng::sample_rng(4, 0, 1, 3));
        assert_eq!(x, y, "keyed");
    }

    #[test]
    fn rand_augment_is_keyed_and_in_range() {
        let img = ramp(16, 16);
        let run = |seed| {
            let mut x = img.clone();
            rand_augment(&mut x, 16, 16, 2, 9, &mut crate::rng::sample_rng(seed, 0, 1, 3));
            x
        };
        assert_eq!(run(1), run(1));
        assert!(run(1).iter().all(|v| (0.0..=1.0).contains(v)));
    }
}
