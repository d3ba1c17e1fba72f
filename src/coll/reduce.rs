//! Host reduction kernels: `dst = a op b` over byte buffers of one data type.
//!
//! Written as plain loops over typed slices, with the operation chosen outside the loop, so
//! that the compiler vectorizes them. Half and bfloat16 compute in `f32` and round once per
//! pairwise step, as the device kernels do. Float max and min are symmetric even for signed
//! zeros (`max(-0, +0) = +0` whichever comes first), because the ranks of an all-reduce combine
//! their operands in different orders and must still agree bit for bit.

use crate::types::{DataType, ReduceOp};
use half::{bf16, f16};

/// Arithmetic of one element type.
trait Arith: bytemuck::Pod {
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

#[inline(always)]
fn fmax<F: PartialOrd + Copy>(a: F, b: F, a_neg: bool, a_nan: bool, b_nan: bool) -> F {
    if a > b {
        a
    } else if b > a {
        b
    } else if a_nan {
        a
    } else if b_nan || a_neg {
        b
    } else {
        a
    }
}

#[inline(always)]
fn fmin<F: PartialOrd + Copy>(a: F, b: F, a_neg: bool, a_nan: bool, b_nan: bool) -> F {
    if a < b {
        a
    } else if b < a {
        b
    } else if a_nan {
        a
    } else if b_nan || !a_neg {
        b
    } else {
        a
    }
}

macro_rules! float_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(self, o: Self) -> Self { self + o }
            #[inline(always)] fn mul(self, o: Self) -> Self { self * o }
            #[inline(always)] fn max(self, o: Self) -> Self {
                fmax(self, o, self.is_sign_negative(), self.is_nan(), o.is_nan())
            }
            #[inline(always)] fn min(self, o: Self) -> Self {
                fmin(self, o, self.is_sign_negative(), self.is_nan(), o.is_nan())
            }
            #[inline(always)] fn div_n(self, n: usize) -> Self { self / n as $t }
        }
    )*};
}
float_arith!(f32, f64);

macro_rules! half_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() + o.to_f32()) }
            #[inline(always)] fn mul(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() * o.to_f32()) }
            #[inline(always)] fn max(self, o: Self) -> Self {
                let (a, b) = (self.to_f32(), o.to_f32());
                let r = fmax(a, b, self.is_sign_negative(), self.is_nan(), o.is_nan());
                if r.to_bits() == a.to_bits() { self } else { o }
            }
            #[inline(always)] fn min(self, o: Self) -> Self {
                let (a, b) = (self.to_f32(), o.to_f32());
                let r = fmin(a, b, self.is_sign_negative(), self.is_nan(), o.is_nan());
                if r.to_bits() == a.to_bits() { self } else { o }
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
    match op {
        ReduceOp::Sum | ReduceOp::Avg => combine_loop(dst, a, b, T::add),
        ReduceOp::Prod => combine_loop(dst, a, b, T::mul),
        ReduceOp::Max => combine_loop(dst, a, b, T::max),
        ReduceOp::Min => combine_loop(dst, a, b, T::min),
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
