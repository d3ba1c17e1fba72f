//! The host reduction kernels against a plain copy of the same bytes: `dst = dst op src` reads
//! two buffers and writes one, so memory-bound it runs at about the speed of a copy.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use multiworld::{DataType, ReduceOp};

fn kernels(c: &mut Criterion) {
    let mut g = c.benchmark_group("reduce");
    for size in [64usize << 10, 4 << 20] {
        let src = vec![1u8; size];
        let mut dst = vec![2u8; size];
        // Bytes read and written, as for the copy: the kernel also reads dst.
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("copy", size), &size, |b, _| {
            b.iter(|| dst.copy_from_slice(std::hint::black_box(&src)))
        });
        for (d, op) in [
            (DataType::F32, ReduceOp::Sum),
            (DataType::F32, ReduceOp::Max),
            (DataType::F64, ReduceOp::Sum),
            (DataType::BF16, ReduceOp::Sum),
            (DataType::F16, ReduceOp::Sum),
            (DataType::I32, ReduceOp::Sum),
            (DataType::U8, ReduceOp::Prod),
        ] {
            g.bench_with_input(BenchmarkId::new(format!("{}-{}", d.name(), op.name()), size), &size, |b, _| {
                b.iter(|| multiworld::__bench::reduce_into(d, op, &mut dst, std::hint::black_box(&src)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
