//! Host reduction kernels: `dst = a op b` over byte buffers of one data type.
//!
//! Written as plain loops over typed slices, with the operation chosen outside the loop, so
//! that the compiler vectorizes them. Half and bfloat16 compute in `f32` and round once per
//! pairwise step, as the device kernels do. Float max and min are symmetric even for signed
//! zeros (`max(-0, +0) = +0` whichever comes first), because the ranks of an all-reduce combine
//! their operands in different orders and must still agree bit for bit.

use crate::api::types::{DataType, ReduceOp};
use half::{bf16, f16};

/// Arithmetic of one element type.
trait Arith: bytemuck::Pod + 'static {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn div_n(self, n: usize) -> Self;
}

macro_rules! int_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            #[inline(always)] fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            #[inline(always)] fn max(self, o: Self) -> Self { Ord::max(self, o) }
            #[inline(always)] fn min(self, o: Self) -> Self { Ord::min(self, o) }
            #[inline(always)] fn div_n(self, n: usize) -> Self { (self as i128 / n as i128) as $t }
        }
    )*};
}
int_arith!(i8, u8, i32, u32, i64, u64);

/// Maximum and minimum that both orders agree on bit for bit, for one float type: equal values
/// (like `-0` and `+0`) give the bits both share for the maximum (`+0`) and either has for the
/// minimum (`-0`); a NaN operand wins. Written with selects so that they vectorize.
macro_rules! symmetric_min_max {
    ($t:ty, $max:ident, $min:ident) => {
        #[inline(always)]
        fn $max(a: $t, b: $t) -> $t {
            let pick = if a == b {
                <$t>::from_bits(a.to_bits() & b.to_bits())
            } else if a > b {
                a
            } else {
                b
            };
            if a.is_nan() {
                a
            } else {
                pick
            }
        }

        #[inline(always)]
        fn $min(a: $t, b: $t) -> $t {
            let pick = if a == b {
                <$t>::from_bits(a.to_bits() | b.to_bits())
            } else if a < b {
                a
            } else {
                b
            };
            if a.is_nan() {
                a
            } else {
                pick
            }
        }
    };
}
symmetric_min_max!(f32, fmax32, fmin32);
symmetric_min_max!(f64, fmax64, fmin64);

impl Arith for f32 {
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        self * o
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        fmax32(self, o)
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        fmin32(self, o)
    }
    #[inline(always)]
    fn div_n(self, n: usize) -> Self {
        self / n as f32
    }
}

impl Arith for f64 {
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        self * o
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        fmax64(self, o)
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        fmin64(self, o)
    }
    #[inline(always)]
    fn div_n(self, n: usize) -> Self {
        self / n as f64
    }
}

/// Half and bfloat16 compute in `f32` and round once per step; max and min keep the winning
/// operand's own bits.
macro_rules! half_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() + o.to_f32()) }
            #[inline(always)] fn mul(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() * o.to_f32()) }
            #[inline(always)] fn max(self, o: Self) -> Self {
                let (a, b) = (self.to_f32(), o.to_f32());
                if fmax32(a, b).to_bits() == a.to_bits() { self } else { o }
            }
            #[inline(always)] fn min(self, o: Self) -> Self {
                let (a, b) = (self.to_f32(), o.to_f32());
                if fmin32(a, b).to_bits() == a.to_bits() { self } else { o }
            }
            #[inline(always)] fn div_n(self, n: usize) -> Self { <$t>::from_f32(self.to_f32() / n as f32) }
        }
    )*};
}
half_arith!(f16, bf16);

#[inline(always)]
fn combine_loop<T: Arith>(dst: &mut [T], a: Option<&[T]>, b: &[T], f: impl Fn(T, T) -> T) {
    match a {
        Some(a) => {
            for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
                *d = f(*x, *y);
            }
        }
        None => {
            for (d, y) in dst.iter_mut().zip(b) {
                *d = f(*d, *y);
            }
        }
    }
}

fn combine_typed<T: Arith>(op: ReduceOp, dst: &mut [T], a: Option<&[T]>, b: &[T]) {
    // 16-bit floats: convert in blocks with the slice converters (vector instructions where the
    // CPU has them), compute in f32, convert back: the same results as element by element.
    if let Some(done) = combine_16bit(op, dst, a, b) {
        return done;
    }
    match op {
        ReduceOp::Sum | ReduceOp::Avg => combine_loop(dst, a, b, T::add),
        ReduceOp::Prod => combine_loop(dst, a, b, T::mul),
        ReduceOp::Max => combine_loop(dst, a, b, T::max),
        ReduceOp::Min => combine_loop(dst, a, b, T::min),
    }
}

/// Block of 16-bit floats converted at a time (two f32 blocks live on the stack).
const BLOCK: usize = 512;

/// Block conversions between 16-bit floats and f32. f16 uses `half`'s slice converters (F16C
/// where the CPU has it); bf16 is a shift and a rounding, written here as plain loops that
/// vectorize, with exactly `half`'s rounding and NaN rules.
trait Block16: Copy {
    fn to_f32s(src: &[Self], dst: &mut [f32]);
    fn from_f32s(src: &[f32], dst: &mut [Self]);
}

impl Block16 for f16 {
    fn to_f32s(src: &[f16], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    fn from_f32s(src: &[f32], dst: &mut [f16]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    }
}

impl Block16 for bf16 {
    fn to_f32s(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            let i = s.to_bits() as u32;
            let q = if (i & 0x7fff) > 0x7f80 { i | 0x40 } else { i };
            *d = f32::from_bits(q << 16);
        }
    }
    fn from_f32s(src: &[f32], dst: &mut [bf16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            let x = s.to_bits();
            let rounded = (x >> 16) + (((x & 0x8000 != 0) & (x & 0x17fff != 0)) as u32);
            let v = if x & 0x7fff_ffff > 0x7f80_0000 { (x >> 16) | 0x40 } else { rounded };
            *d = bf16::from_bits(v as u16);
        }
    }
}

/// [`combine_typed`] for `f16` and `bf16`; `None` for other types.
fn combine_16bit<T: Arith>(op: ReduceOp, dst: &mut [T], a: Option<&[T]>, b: &[T]) -> Option<()> {
    macro_rules! run {
        ($h:ty) => {{
            let dst: &mut [$h] = bytemuck::try_cast_slice_mut(dst).ok()?;
            let a: Option<&[$h]> = match a {
                Some(a) => Some(bytemuck::try_cast_slice(a).ok()?),
                None => None,
            };
            let b: &[$h] = bytemuck::try_cast_slice(b).ok()?;
            let (mut fa, mut fb) = ([0f32; BLOCK], [0f32; BLOCK]);
            for start in (0..dst.len()).step_by(BLOCK) {
                let n = BLOCK.min(dst.len() - start);
                let r = start..start + n;
                match a {
                    Some(a) => <$h>::to_f32s(&a[r.clone()], &mut fa[..n]),
                    None => <$h>::to_f32s(&dst[r.clone()], &mut fa[..n]),
                }
                <$h>::to_f32s(&b[r.clone()], &mut fb[..n]);
                match op {
                    ReduceOp::Sum | ReduceOp::Avg | ReduceOp::Prod => {
                        if op == ReduceOp::Prod {
                            fa[..n].iter_mut().zip(&fb[..n]).for_each(|(x, y)| *x *= *y);
                        } else {
                            fa[..n].iter_mut().zip(&fb[..n]).for_each(|(x, y)| *x += *y);
                        }
                        <$h>::from_f32s(&fa[..n], &mut dst[r]);
                    }
                    ReduceOp::Max | ReduceOp::Min => {
                        for j in 0..n {
                            let (x, y) = (fa[j], fb[j]);
                            let w = if op == ReduceOp::Max { fmax32(x, y) } else { fmin32(x, y) };
                            let first = match a {
                                Some(a) => a[start + j],
                                None => dst[start + j],
                            };
                            dst[start + j] = if w.to_bits() == x.to_bits() { first } else { b[start + j] };
                        }
                    }
                }
            }
            Some(())
        }};
    }
    match std::any::TypeId::of::<T>() {
        t if t == std::any::TypeId::of::<f16>() => run!(f16),
        t if t == std::any::TypeId::of::<bf16>() => run!(bf16),
        _ => None,
    }
}

/// Typed view of bytes, or `None` when misaligned or not a whole number of elements.
fn typed<T: bytemuck::Pod>(b: &[u8]) -> Option<&[T]> {
    bytemuck::try_cast_slice(b).ok()
}

fn typed_mut<T: bytemuck::Pod>(b: &mut [u8]) -> Option<&mut [T]> {
    bytemuck::try_cast_slice_mut(b).ok()
}

fn combine_bytes<T: Arith>(op: ReduceOp, dst: &mut [u8], a: Option<&[u8]>, b: &[u8]) {
    let n = dst.len() / std::mem::size_of::<T>();
    let aligned = typed::<T>(b).is_some() && a.is_none_or(|a| typed::<T>(a).is_some());
    if aligned {
        if let Some(d) = typed_mut::<T>(dst) {
            combine_typed(op, d, a.and_then(typed::<T>), typed::<T>(b).unwrap_or(&[]));
            return;
        }
    }
    // Misaligned (a frame that landed at an odd offset of a staging buffer): element by element.
    let sz = std::mem::size_of::<T>();
    for i in 0..n {
        let r = i * sz..(i + 1) * sz;
        let x: T = bytemuck::pod_read_unaligned(&a.unwrap_or(dst)[r.clone()]);
        let y: T = bytemuck::pod_read_unaligned(&b[r.clone()]);
        let mut one = [x];
        combine_typed(op, &mut one, None, &[y]);
        dst[r].copy_from_slice(bytemuck::bytes_of(&one[0]));
    }
}

macro_rules! by_type {
    ($dtype:expr, $f:ident, $($args:expr),*) => {
        match $dtype {
            DataType::I8 => $f::<i8>($($args),*),
            DataType::U8 => $f::<u8>($($args),*),
            DataType::I32 => $f::<i32>($($args),*),
            DataType::U32 => $f::<u32>($($args),*),
            DataType::I64 => $f::<i64>($($args),*),
            DataType::U64 => $f::<u64>($($args),*),
            DataType::F16 => $f::<f16>($($args),*),
            DataType::F32 => $f::<f32>($($args),*),
            DataType::F64 => $f::<f64>($($args),*),
            DataType::BF16 => $f::<bf16>($($args),*),
        }
    };
}

/// `dst[i] = dst[i] op src[i]`. Lengths must be equal whole numbers of elements.
pub(crate) fn reduce_into(dtype: DataType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    by_type!(dtype, combine_bytes, op, dst, None, src)
}

/// `dst[i] = a[i] op b[i]`, with `dst` apart from `a` and `b`.
pub(crate) fn reduce3(dtype: DataType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) {
    debug_assert!(dst.len() == a.len() && a.len() == b.len());
    by_type!(dtype, combine_bytes, op, dst, Some(a), b)
}

fn scale_bytes<T: Arith>(dst: &mut [u8], n: usize) {
    if let Some(d) = typed_mut::<T>(dst) {
        for x in d {
            *x = x.div_n(n);
        }
        return;
    }
    let sz = std::mem::size_of::<T>();
    for c in dst.chunks_exact_mut(sz) {
        let x: T = bytemuck::pod_read_unaligned(c);
        c.copy_from_slice(bytemuck::bytes_of(&x.div_n(n)));
    }
}

/// `dst[i] = dst[i] / n`: the last step of an average.
pub(crate) fn scale_avg(dtype: DataType, dst: &mut [u8], n: usize) {
    by_type!(dtype, scale_bytes, dst, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_and_products_per_type() {
        let a: Vec<f32> = vec![1.0, 2.5, -3.0];
        let b: Vec<f32> = vec![4.0, 0.5, 3.0];
        let mut d = vec![0f32; 3];
        reduce3(
            DataType::F32,
            ReduceOp::Sum,
            bytemuck::cast_slice_mut(&mut d),
            bytemuck::cast_slice(&a),
            bytemuck::cast_slice(&b),
        );
        assert_eq!(d, vec![5.0, 3.0, 0.0]);
        let mut x: Vec<i8> = vec![100, -128, 7];
        reduce_into(
            DataType::I8,
            ReduceOp::Sum,
            bytemuck::cast_slice_mut(&mut x),
            bytemuck::cast_slice(&[100i8, -1, 1]),
        );
        assert_eq!(x, vec![-56, 127, 8]);
        let mut h = vec![f16::from_f32(1.5), f16::from_f32(-2.0)];
        reduce_into(
            DataType::F16,
            ReduceOp::Prod,
            bytemuck::cast_slice_mut(&mut h),
            bytemuck::cast_slice(&[f16::from_f32(2.0), f16::from_f32(0.25)]),
        );
        assert_eq!(h, vec![f16::from_f32(3.0), f16::from_f32(-0.5)]);
    }

    #[test]
    fn float_max_min_are_symmetric_on_signed_zero() {
        for (a, b) in [(0.0f32, -0.0f32), (-0.0, 0.0)] {
            let mut d = [a];
            reduce_into(DataType::F32, ReduceOp::Max, bytemuck::cast_slice_mut(&mut d), bytemuck::cast_slice(&[b]));
            assert_eq!(d[0].to_bits(), 0.0f32.to_bits());
            let mut d = [a];
            reduce_into(DataType::F32, ReduceOp::Min, bytemuck::cast_slice_mut(&mut d), bytemuck::cast_slice(&[b]));
            assert_eq!(d[0].to_bits(), (-0.0f32).to_bits());
        }
        for (a, b) in [(bf16::ZERO, bf16::NEG_ZERO), (bf16::NEG_ZERO, bf16::ZERO)] {
            let mut d = [a];
            reduce_into(DataType::BF16, ReduceOp::Max, bytemuck::cast_slice_mut(&mut d), bytemuck::cast_slice(&[b]));
            assert_eq!(d[0].to_bits(), bf16::ZERO.to_bits());
        }
    }

    #[test]
    fn misaligned_input_gives_the_same_result() {
        let vals: Vec<f64> = (0..9).map(|i| i as f64 * 1.5).collect();
        let src = bytemuck::cast_slice::<f64, u8>(&vals).to_vec();
        let mut shifted = vec![0u8; src.len() + 1];
        shifted[1..].copy_from_slice(&src);
        let mut d1 = vec![1.0f64; 9];
        let mut d2 = d1.clone();
        reduce_into(DataType::F64, ReduceOp::Sum, bytemuck::cast_slice_mut(&mut d1), &src);
        reduce_into(DataType::F64, ReduceOp::Sum, bytemuck::cast_slice_mut(&mut d2), &shifted[1..]);
        assert_eq!(d1, d2);
        assert_eq!(d1[2], 4.0);
    }

    /// The block-converting path for 16-bit floats gives the same bits as element-by-element
    /// arithmetic, on random values including signed zeros, infinities and subnormals.
    #[test]
    fn half_blocks_match_element_by_element() {
        let mut rng = crate::testutil::Rng::new(11);
        for op in ReduceOp::ALL {
            let n = 3 * BLOCK + 17;
            let mut bits = |_| {
                let v = rng.next() as u16;
                // Avoid NaNs (their payloads may legitimately differ); keep everything else.
                if (v & 0x7c00) == 0x7c00 && (v & 0x03ff) != 0 {
                    0x8000
                } else {
                    v
                }
            };
            let a: Vec<f16> = (0..n).map(|i| f16::from_bits(bits(i))).collect();
            let b: Vec<f16> = (0..n).map(|i| f16::from_bits(bits(i))).collect();
            let mut fast = vec![f16::ZERO; n];
            combine_typed(op, &mut fast, Some(&a), &b);
            let mut slow = vec![f16::ZERO; n];
            match op {
                ReduceOp::Sum | ReduceOp::Avg => combine_loop(&mut slow, Some(&a), &b, Arith::add),
                ReduceOp::Prod => combine_loop(&mut slow, Some(&a), &b, Arith::mul),
                ReduceOp::Max => combine_loop(&mut slow, Some(&a), &b, Arith::max),
                ReduceOp::Min => combine_loop(&mut slow, Some(&a), &b, Arith::min),
            }
            let fb: Vec<u16> = fast.iter().map(|x| x.to_bits()).collect();
            let sb: Vec<u16> = slow.iter().map(|x| x.to_bits()).collect();
            assert_eq!(fb, sb, "{op}");
            let ab: Vec<bf16> = a.iter().map(|x| bf16::from_bits(x.to_bits())).collect();
            let bb: Vec<bf16> = b.iter().map(|x| bf16::from_bits(x.to_bits())).collect();
            let mut fast = vec![bf16::ZERO; n];
            combine_typed(op, &mut fast, Some(&ab), &bb);
            let mut slow = ab.clone();
            match op {
                ReduceOp::Sum | ReduceOp::Avg => combine_loop(&mut slow, None, &bb, Arith::add),
                ReduceOp::Prod => combine_loop(&mut slow, None, &bb, Arith::mul),
                ReduceOp::Max => combine_loop(&mut slow, None, &bb, Arith::max),
                ReduceOp::Min => combine_loop(&mut slow, None, &bb, Arith::min),
            }
            for (i, (x, y)) in fast.iter().zip(&slow).enumerate() {
                assert!(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()), "{op} bf16 at {i}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn average_divides_by_ranks() {
        let mut d = vec![9i32, -9, 10];
        scale_avg(DataType::I32, bytemuck::cast_slice_mut(&mut d), 3);
        assert_eq!(d, vec![3, -3, 3]);
        let mut h = vec![bf16::from_f32(6.0)];
        scale_avg(DataType::BF16, bytemuck::cast_slice_mut(&mut h), 4);
        assert_eq!(h[0], bf16::from_f32(1.5));
    }
}
