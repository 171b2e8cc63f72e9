//! Vectorisable elementwise math shared by the fused kernels: a maximum on eight lanes,
//! `e^x` without libm calls, SwiGLU's gate, the rounding of f32 to bf16, and
//! `multiversioned!`, which compiles such a loop twice (for x86-64's baseline and for AVX-512)
//! and picks one at run time by the CPU's features, so the binary runs on any x86-64. Both
//! copies run the same operations in the same order (reductions on a fixed eight lanes, no
//! contraction into FMA), only on wider registers.

use half::bf16;
use half::slice::HalfFloatSliceExt;

/// The largest value of `x` (`-inf` when empty), reduced on eight lanes so that it vectorises.
#[inline(always)]
pub(crate) fn max_of(x: &[f32]) -> f32 {
    const L: usize = 8;
    let mut lanes = [f32::NEG_INFINITY; L];
    let mut chunks = x.chunks_exact(L);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// `e^x` for `x <= 0` (softmax arguments), vectorisable: Cody-Waite range reduction to
/// `r` in `[-ln2/2, ln2/2]`, Cephes' degree-6 polynomial for `e^r`, the exponent set by bits.
/// Relative error below 2.5e-7 where the result is normal; 0 below -87.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let under = x < -87.0;
    // Selects, not `clamp` (whose NaN rules add branches), so that the loop vectorises.
    let x = if under { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    // Round to nearest by adding 1.5 * 2^23: the sum's low mantissa bits are then the integer
    // itself, read back without a float-to-int conversion or a call to `floor` (a libm call on
    // x86-64's baseline), which both stop vectorisation.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let scaled = e * f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if under { 0.0 } else { scaled }
}

/// Defines `$name`, which runs the body compiled for AVX-512 on CPUs that have it (the loop
/// then runs on 16 lanes) and for the baseline elsewhere.
macro_rules! multiversioned {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
                fn wide($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has every feature `wide` is compiled for (checked above).
                    #[allow(unsafe_code)]
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversioned;

multiversioned! {
    /// `out = silu(gate) * up` elementwise, `silu(g) = g / (1 + e^-g)`; the three slices have
    /// one length.
    pub(crate) fn silu_mul(out: &mut [f32], gate: &[f32], up: &[f32]) {
        let n = out.len();
        let (gate, up) = (&gate[..n], &up[..n]);
        for i in 0..n {
            let g = gate[i];
            out[i] = g / (1.0 + exp(-g)) * up[i];
        }
    }
}

multiversioned! {
    /// The backward of [`silu_mul`]: given `dout`, `du = dout * silu(g)` and
    /// `dg = dout * u * s * (1 + g * (1 - s))` with `s = 1 / (1 + e^-g)`.
    pub(crate) fn silu_mul_grad(dg: &mut [f32], du: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
        let n = dg.len();
        let (du, dout, gate, up) = (&mut du[..n], &dout[..n], &gate[..n], &up[..n]);
        for i in 0..n {
            let g = gate[i];
            let s = 1.0 / (1.0 + exp(-g));
            du[i] = dout[i] * g * s;
            dg[i] = dout[i] * up[i] * s * (1.0 + g * (1.0 - s));
        }
    }
}

multiversioned! {
    /// RMSNorm of one row: `out = x * r * w` with `r = 1 / sqrt(mean(x^2) + eps)`, the sum
    /// on eight lanes; returns `r`.
    pub(crate) fn rms_norm_row(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
        let r = 1.0 / (sum_of_products(x, x) / x.len() as f32 + eps).sqrt();
        let n = out.len();
        let (x, w) = (&x[..n], &w[..n]);
        for i in 0..n {
            out[i] = x[i] * r * w[i];
        }
        r
    }
}

multiversioned! {
    /// The backward of [`rms_norm_row`] for one row with its `r`: writes
    /// `dx = r * dy * w - x * r^3 / n * sum(dy * w * x)` and adds `dy * x * r` into `dw`.
    pub(crate) fn rms_norm_row_grad(dx: &mut [f32], dw: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], r: f32) {
        let n = dx.len();
        let (dw, dy, x, w) = (&mut dw[..n], &dy[..n], &x[..n], &w[..n]);
        const L: usize = 8;
        let mut lanes = [0f32; L];
        let mut i = 0;
        while i + L <= n {
            for l in 0..L {
                lanes[l] += dy[i + l] * w[i + l] * x[i + l];
            }
            i += L;
        }
        let mut dot: f32 = lanes.iter().sum();
        for j in i..n {
            dot += dy[j] * w[j] * x[j];
        }
        let c = r * r * r * dot / n as f32;
        for j in 0..n {
            dx[j] = r * dy[j] * w[j] - x[j] * c;
            dw[j] += dy[j] * x[j] * r;
        }
    }
}

/// `sum(a * b)` on eight lanes, so that it vectorises.
#[inline(always)]
pub(crate) fn sum_of_products(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 8;
    let mut lanes = [0f32; L];
    let mut ca = a.chunks_exact(L);
    let mut cb = b.chunks_exact(L);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..L {
            lanes[l] += x[l] * y[l];
        }
    }
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + rest
}

multiversioned! {
    /// `acc += part`, element by element.
    pub(crate) fn add_in_place(acc: &mut [f32], part: &[f32]) {
        for (a, &p) in acc.iter_mut().zip(part) {
            *a += p;
        }
    }
}

multiversioned! {
    /// `dst = src` rounded to bf16, to nearest even (NaN stays NaN, quieted), as
    /// `bf16::from_f32` rounds but without its branches, so that the loop vectorises.
    pub fn round_to_bf16(dst: &mut [bf16], src: &[f32]) {
        let dst: &mut [u16] = dst.reinterpret_cast_mut();
        let src = &src[..dst.len()];
        for (d, &x) in dst.iter_mut().zip(src) {
            let b = x.to_bits();
            let nan = b & 0x7FFF_FFFF > 0x7F80_0000;
            let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
            *d = if nan { (b >> 16) as u16 | 0x0040 } else { rounded };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_equals_half() {
        let mut src: Vec<f32> = (0..100_003u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .collect();
        src.extend([
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x3F80_8000), // a tie: rounds to even (down)
            f32::from_bits(0x3F81_8000), // a tie: rounds to even (up)
            f32::from_bits(1),           // the smallest subnormal
        ]);
        let mut got = vec![bf16::ZERO; src.len()];
        round_to_bf16(&mut got, &src);
        for (g, &x) in got.iter().zip(&src) {
            assert_eq!(
                g.to_bits(),
                bf16::from_f32(x).to_bits(),
                "{x:e} ({:#x})",
                x.to_bits()
            );
        }
    }

    #[test]
    fn silu_mul_is_accurate() {
        let gate: Vec<f32> = (0..1001).map(|i| (i as f32 - 500.0) / 7.0).collect();
        let up: Vec<f32> = (0..1001).map(|i| 1.0 + i as f32 / 1000.0).collect();
        let mut out = vec![0f32; gate.len()];
        silu_mul(&mut out, &gate, &up);
        for ((&o, &g), &u) in out.iter().zip(&gate).zip(&up) {
            let want = (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32;
            assert!(
                (o - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{g}: {o} vs {want}"
            );
        }
    }

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }
}
