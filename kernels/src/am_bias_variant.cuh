// FlashInfer attention variant: a compacted document's logit bias beta[kv_head, slot] on the first
// `slots` KV positions of a request (logical index kv_idx, as the paged prefill and decode kernels
// pass it). Per request, params.am_rows holds (base, slots) as floats; base < 0 means no document.
// params.am_bias is this layer's region of sglang_am.kernels.bias_table.BiasTable, where a document's
// beta [H_kv, slots] starts at base. Logits leave the transform already scaled, in natural-log units,
// so sm_scale_log2 is log2(e) (as FlashInfer's own ALiBi path does).
struct AMDocumentBias : AttentionVariantBase {
  static constexpr bool use_softmax = true;
  uint32_t qo_len, kv_len, window_left;
  float sm_scale_log2;
  int32_t base, slots;

  template <typename Params>
  __device__ __host__ AMDocumentBias(const Params& params, uint32_t batch_idx, uint8_t* smem_ptr) {
    qo_len = params.get_qo_len(batch_idx);
    kv_len = params.get_kv_len(batch_idx);
    window_left = kv_len;
    sm_scale_log2 = math::log2e;
    base = static_cast<int32_t>(params.am_rows[2 * batch_idx]);
    slots = static_cast<int32_t>(params.am_rows[2 * batch_idx + 1]);
  }

  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {
    logits = logits * static_cast<float>(params.sm_scale);
    if (base >= 0 && kv_idx < static_cast<uint32_t>(slots)) {
      logits += params.am_bias[base + kv_head_idx * slots + kv_idx];
    }
    return logits;
  })
};
