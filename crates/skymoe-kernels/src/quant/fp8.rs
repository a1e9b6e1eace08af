//! FP8 E4M3 (the "fn" variant of OCP FP8: 4 exponent bits, bias 7, 3 mantissa bits, no
//! infinities, ±448 the largest finite value, `0x7F`/`0xFF` NaN) to and from f32.

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// Decode one E4M3 byte.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0F) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0F && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        // Subnormal: man/8 · 2^(1-7).
        sign * man * (2.0f32).powi(-9)
    } else {
        sign * (1.0 + man / 8.0) * (2.0f32).powi(exp - 7)
    }
}

/// Encode an f32 as E4M3: round to nearest, ties to even; values beyond ±448 saturate to
/// ±448 (as PyTorch's `to(torch.float8_e4m3fn)` after clamping, which quantisers do); NaN
/// stays NaN.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    // Smallest normal is 2^-6; below it the spacing is 2^-9 (subnormals).
    if a < (2.0f32).powi(-6) {
        let q = round_half_even(a * 512.0); // units of 2^-9, 0..=8
                                            // q == 8 is the smallest normal (exponent 1, mantissa 0) = 0x08: same bit pattern.
        return sign | q as u8;
    }
    let bits = a.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32 - 127; // -6..=8
    let man = bits & 0x7F_FFFF;
    // Keep 3 mantissa bits, round to nearest even on the 20 dropped ones.
    let mut m3 = man >> 20;
    let rest = man & 0xF_FFFF;
    let half = 0x8_0000;
    if rest > half || (rest == half && m3 & 1 == 1) {
        m3 += 1;
    }
    let mut e = exp + 7;
    if m3 == 8 {
        m3 = 0;
        e += 1;
    }
    // 448 = exponent 15, mantissa 6 is the largest; a.min(448) keeps us there.
    sign | ((e as u8) << 3) | m3 as u8
}

fn round_half_even(v: f32) -> f32 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - v.signum()
    } else {
        r
    }
}

/// All 256 E4M3 values as f32 (for scalar decoding).
pub fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0.0f32; 256];
        for (i, v) in t.iter_mut().enumerate() {
            *v = e4m3_to_f32(i as u8);
        }
        t
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_code_round_trips() {
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                continue;
            }
            let back = f32_to_e4m3(v);
            // -0 and +0 both decode to zero.
            assert_eq!(e4m3_to_f32(back), v, "code {b:#04x}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
    }

    #[test]
    fn rounds_to_nearest_even_and_saturates() {
        // Between 1.0 (0x38) and 1.125 (0x39): the midpoint goes to the even code 1.0.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.07), 0x39);
        // Between 1.125 and 1.25 the midpoint goes to 1.25 (even mantissa 2).
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
        assert_eq!(f32_to_e4m3(1e6), 0x7E);
        assert_eq!(f32_to_e4m3(-1e6), 0xFE);
        // Subnormal midpoint 0.5·2^-9 rounds to even (0).
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00);
        assert_eq!(f32_to_e4m3(3.0 * 2f32.powi(-10)), 0x02);
        // Brute force against the nearest code.
        let codes: Vec<f32> = (0..=0x7Eu8).map(e4m3_to_f32).collect();
        let mut x = 0.0f32;
        while x < 460.0 {
            let got = e4m3_to_f32(f32_to_e4m3(x));
            let best = codes
                .iter()
                .map(|c| (c - x.min(448.0)).abs())
                .fold(f32::INFINITY, f32::min);
            assert_eq!((got - x.min(448.0)).abs(), best, "x = {x}");
            x = x * 1.013 + 1e-4;
        }
    }
}
