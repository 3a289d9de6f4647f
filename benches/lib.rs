//! Benchmark support: cases shared by the criterion benches (`bench_main.rs`, `cargo xtask bench`)
//! and the side-by-side binaries in `src/bin/` (`cargo xtask bench-<name>`).

use facerec_loss_heads::{
    AdaFaceConfig, ArcFaceConfig, ArcFaceGradient, CombinedConfig, CosFaceConfig,
    CurricularFaceConfig, ElasticArcConfig, ElasticArcPlusConfig, ElasticCosConfig,
    ElasticCosPlusConfig, GceConfig, HeadConfig, MagFaceConfig, MarginForm, NormFaceConfig,
    PairwiseConfig, SoftmaxConfig, SphereFaceConfig, SubCenterArcFaceConfig,
};

/// Every head with its default parameters (s = 64 everywhere, as the PyTorch reference script
/// uses), and the step to set before timing (SphereFace: lambda at its floor).
pub fn head_cases() -> Vec<(&'static str, HeadConfig, u64)> {
    let arc = |gradient| {
        HeadConfig::Arcface(ArcFaceConfig {
            gradient,
            ..Default::default()
        })
    };
    vec![
        ("softmax", HeadConfig::Softmax(SoftmaxConfig {}), 0),
        (
            "normface",
            HeadConfig::Normface(NormFaceConfig::default()),
            0,
        ),
        // λ at its floor (5), as the reference's fixed λ.
        (
            "sphereface",
            HeadConfig::Sphereface(SphereFaceConfig::default()),
            1_000_000,
        ),
        ("cosface", HeadConfig::Cosface(CosFaceConfig::default()), 0),
        ("arcface", arc(ArcFaceGradient::Exact), 0),
        ("arcface_detached", arc(ArcFaceGradient::Detached), 0),
        (
            "combined",
            HeadConfig::Combined(CombinedConfig::default()),
            0,
        ),
        (
            "elastic_arc",
            HeadConfig::ElasticArc(ElasticArcConfig::default()),
            0,
        ),
        (
            "elastic_cos",
            HeadConfig::ElasticCos(ElasticCosConfig::default()),
            0,
        ),
        (
            "elastic_arc_plus",
            HeadConfig::ElasticArcPlus(ElasticArcPlusConfig::default()),
            0,
        ),
        (
            "elastic_cos_plus",
            HeadConfig::ElasticCosPlus(ElasticCosPlusConfig::default()),
            0,
        ),
        // t = 0 (a fresh head; the cost does not depend on t). Not row-scaled: the unfused path.
        (
            "curricularface",
            HeadConfig::Curricularface(CurricularFaceConfig::default()),
            0,
        ),
        // Timed without feature norms (ẑ = 0 for every row; the norm statistics cost O(B)).
        // Not row-scaled: the unfused path.
        ("adaface", HeadConfig::Adaface(AdaFaceConfig::default()), 0),
        // K = 3: the [B, 3C] cosines pooled by a max, then ArcFace (fused).
        (
            "subcenter_arcface",
            HeadConfig::SubcenterArcface(SubCenterArcFaceConfig::default()),
            0,
        ),
        // Timed without feature norms (every row at the margin l_m; the norm terms cost O(B)).
        ("magface", HeadConfig::Magface(MagFaceConfig::default()), 0),
    ]
}

/// The GCE losses timed next to the heads (s = 64, ω = 1/(B − 1), no prototype replacement: the
/// benches start from `[B, C]` scores, without embeddings): `gce` with the default angular
/// margins (m_t = 0.5, m_n = 0.1), `gce_additive` with additive ones (m_t = 0.35, m_n = 0.1).
pub fn gce_cases() -> Vec<(&'static str, GceConfig)> {
    let base = GceConfig {
        pairwise: PairwiseConfig {
            rate: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    vec![
        ("gce", base.clone()),
        (
            "gce_additive",
            GceConfig {
                target_form: MarginForm::Additive,
                m_t: 0.35,
                nontarget_form: MarginForm::Additive,
                ..base
            },
        ),
    ]
}

/// Median of timings (mean of the two middle ones for an even count).
///
/// # Panics
/// On an empty list.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Smallest timing (best-of).
pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Wait for the device's queued work, so a timer stops after it (no-op on CPU).
pub fn sync(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// CPU time of this process (all threads, user + system), in milliseconds.
///
/// # Panics
/// If `clock_gettime(CLOCK_PROCESS_CPUTIME_ID)` fails.
pub fn process_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant libc defines.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
}
