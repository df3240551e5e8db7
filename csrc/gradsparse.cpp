// Operator schemas of the gradsparse extension, registered once.
// Kernels: csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(gradsparse, CPU, m)), csrc/cuda/*.cu (CUDA); pack,
// pack_gathered and index_zero_ are device-neutral (csrc/pack.cpp, csrc/index_zero.cpp).
// Contracts and costs: docs/kernels.md.
// Reference semantics of every op: gradsparse/_reference.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import gradsparse._C` loads this library, which registers the operators below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(gradsparse, m) {
  // Positions (int64, ascending) of every |x| >= threshold.
  m.def("threshold_select(Tensor x, float threshold) -> Tensor");
  // Positions (int64, ascending) of the exact top-k |x|, ties to the lower index, found through a
  // sampled threshold estimate. NaN input is refused.
  m.def("topk_select(Tensor x, int k, float sample_ratio, int seed) -> Tensor");
  // Segment i of flat x is [offsets[i], offsets[i+1]) (offsets: int64, non-decreasing, within
  // [0, numel]); ks (int64, one per segment) says how many of its elements to keep. Returns the
  // positions in x (int64, ascending) of every segment's exact top-k by magnitude (ties to the
  // lower index), segment after segment: the same as concatenating
  // topk_select(x[offsets[i]:offsets[i+1]], ks[i], sample_ratio, seed) + offsets[i]. A segment
  // keeps clamp(ks[i], 0, its length) positions, so the output's size is known from the inputs;
  // a k of 0 skips a segment (a gap between selected tensors). NaN in a segment with
  // 0 < k < length is refused, naming the segment. offsets and ks may be on any device.
  m.def("segmented_topk_select(Tensor x, Tensor offsets, Tensor ks, float sample_ratio, int seed) -> Tensor");
  // segmented_topk_select (same arguments, checks, errors and positions, returned), and the payload
  // pack_gathered(positions, x, dense, numel, float32, flags, out) writes, written into out (uint8,
  // exactly the payload's size): on the CPU by the selection's last pass, each pair beside its
  // position (fp32 x), with no pass over the positions after it. With bits (int64, exactly
  // ceil(x.numel() / 64) words, on x's device), the positions also as a bitmap: zeroed, then bit
  // p % 64 of word p / 64 set for every position p (on the CPU by the same pass, one OR per
  // 64-element block), what dgc_mask_compensate reads.
  m.def("segmented_topk_select_pack(Tensor x, Tensor offsets, Tensor ks, float sample_ratio, int seed, Tensor dense, "
        "int numel, int flags, Tensor(a!) out, Tensor(b!)? bits=None) -> Tensor");
  // One rank's payload: header | int32 indices | pad | values | dense | pad (gradsparse/payload.py).
  m.def("pack(Tensor indices, Tensor values, Tensor dense, int numel, ScalarType value_dtype, int flags) -> Tensor");
  // pack(indices, source.reshape(-1).index_select(0, indices), dense, numel, value_dtype, flags), the same
  // bytes, written into out (uint8, exactly the payload's size), without the gathered values as a
  // tensor between (the reducer's payload of a selection, in a buffer it reuses between steps).
  m.def("pack_gathered(Tensor indices, Tensor source, Tensor dense, int numel, ScalarType value_dtype, int flags, "
        "Tensor(a!) out) -> ()");
  // For every target (contiguous, floating-point, numel above every position):
  // target.view(-1).index_fill_(0, positions, 0), in one pass over the int64 positions (the memory
  // update of a selection sent exactly: DGC zeroes momentum and velocity at the same positions).
  m.def("index_zero_(Tensor(a!)[] targets, Tensor positions) -> ()");
  // DGC momentum correction and accumulation in one pass, in place on fp32 u and v:
  // u = m*u + g; v = v + u   (nesterov: u = m*(u + g); v = v + u + g).
  m.def("dgc_compensate(Tensor(a!) u, Tensor(b!) v, Tensor g, float momentum, bool nesterov) -> ()");
  // The same into u_out and v_out (fp32, g's size; each either its input itself, or overlapping
  // none of u, v and the other), rounded identically, and in the same pass the largest magnitudes:
  // returns float64 [max|g|, max|u_out|, max|v_out|], each NaN if its tensor holds a NaN (inf if
  // an inf). For a health check before the state changes: compensate into scratch buffers, look
  // at the three numbers (every rank's), then keep the scratch as the new state (swap) or drop it.
  m.def("dgc_compensate_into(Tensor u, Tensor v, Tensor g, float momentum, bool nesterov, Tensor(a!) u_out, "
        "Tensor(b!) v_out) -> Tensor");
  // Error feedback's compensation r_out = r + g (fp32 r and r_out of g's size; r_out is r itself
  // or does not overlap it), rounded like torch's in-place r.add_(g) (the sum in the promoted type
  // of float and g's dtype, stored as float), and in the same pass the largest magnitudes: returns
  // float64 [max|g|, max|r_out|], NaN where a tensor holds a NaN (inf for an inf). The residual
  // memories' twin of dgc_compensate_into, for the same health check before the state changes.
  m.def("residual_compensate_into(Tensor r, Tensor g, Tensor(a!) r_out) -> Tensor");
  // DGC's memory update of the last step fused into this step's compensation, in place: zero u and
  // v at zeroed[j] - offset for every j, then dgc_compensate_into(u, v, g, momentum, nesterov, u, v),
  // returning the same maxima. zeroed: int64, 1-D, non-decreasing, every zeroed[j] - offset within
  // [0, numel). On the CPU, u and v read as zero at those positions as each chunk is compensated:
  // one pass over the state instead of two (docs/kernels.md). A list that is out of range or
  // descending raises (IndexError, ValueError), on the CPU after the pass: every element
  // compensated, the state not zeroed in the chunks whose positions were wrong, nothing outside the
  // tensors written.
  m.def("dgc_zero_compensate(Tensor(a!) u, Tensor(b!) v, Tensor g, float momentum, bool nesterov, Tensor zeroed, "
        "int offset) -> Tensor");
  // dgc_zero_compensate with the positions as a bitmap (segmented_topk_select_pack's bits): u and v
  // read as zero at every i whose bit offset + i is set (bits: int64, at least ceil((offset +
  // numel) / 64) words, on the state's device; offset >= 0), then compensated in place; the same
  // maxima. On the CPU each chunk's bits are expanded into the mask the pass reads: no list to read
  // or scatter. Any bit pattern is valid.
  m.def("dgc_mask_compensate(Tensor(a!) u, Tensor(b!) v, Tensor g, float momentum, bool nesterov, Tensor bits, "
        "int offset) -> Tensor");
  // Selection candidates collected in the compensation pass (docs/kernels.md): dgc_compensate_into
  // (same checks, rounding and maxima) that also returns, for the segments [offsets[s],
  // offsets[s+1]) (offsets int64 [S+1], non-decreasing, from a base offsets[0] >= 0 to base +
  // numel: element i of the piece is at base + i, e.g. its place in the bucket; floors float64 [S];
  // caps int64 [S] >= 0, or -1 to skip the segment: not read, not written, nothing collected, not in
  // the maxima), counts (int64 [S]: how many positions of segment s have |v_out| >=
  // floors[s], NaN counted as a candidate; a floor of +inf collects nothing), positions (int64,
  // in the offsets' coordinates, ascending, segment after segment: the first min(counts[s],
  // caps[s]) of each) and values (float32: v_out at each of those positions, for the selection).
  // Returns (maxima, positions, counts, values).
  // The floor is compared exactly: rounded up to the smallest float at or above it.
  m.def("dgc_compensate_candidates(Tensor u, Tensor v, Tensor g, float momentum, bool nesterov, Tensor(a!) u_out, "
        "Tensor(b!) v_out, Tensor offsets, Tensor floors, Tensor caps) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same for residual_compensate_into (candidates of r_out): returns (maxima [2], positions, counts,
  // values).
  m.def("residual_compensate_candidates(Tensor r, Tensor g, Tensor(a!) r_out, Tensor offsets, Tensor floors, "
        "Tensor caps) -> (Tensor, Tensor, Tensor, Tensor)");
  // segmented_topk_select (same arguments, checks, errors and positions) helped by the candidates
  // of the compensation pass: candidates (int64 positions in x, ascending, segment after segment,
  // min(counts[s], caps[s]) of segment s). A segment with counts[s] <= caps[s] (complete) and
  // counts[s] >= its k > 0 is selected from its candidates alone; the others as
  // segmented_topk_select does. values (optional; x's dtype and device, one per candidate) are
  // x at the candidates, as the compensation pass returned them: the selection from candidates
  // then reads them instead of gathering x (the caller guarantees they are x's; the positions are
  // still checked). Returns (positions, kth): kth float64 [S] is each segment's smallest selected
  // magnitude (+inf where it keeps nothing, 0 where it keeps everything).
  m.def("segmented_topk_select_candidates(Tensor x, Tensor offsets, Tensor ks, Tensor candidates, Tensor counts, "
        "Tensor caps, float sample_ratio, int seed, Tensor? values=None) -> (Tensor, Tensor)");
  // The largest |x| of a floating-point tensor as a 0-dim float64 tensor on x's device: NaN if x
  // holds a NaN, inf for an inf, 0 when empty. One read pass (the reducer's health check).
  m.def("absmax(Tensor x) -> Tensor");
  // Validate every payload, then (zero out if overwrite and) scatter-add alpha * values in rank order.
  // Returns the OR of the payloads' flags as a 0-dim int64 tensor.
  m.def("unpack_add(Tensor[] payloads, Tensor(a!) out, ScalarType value_dtype, Tensor? dense_index, "
        "float alpha, bool overwrite) -> Tensor");
}
