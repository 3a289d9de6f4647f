//! CUDA parity (behind the `cuda-tests` feature; run on a GPU machine): k-means, FINCH, the kNN
//! graph and the cluster statistics give the same clusters on CUDA as on the CPU.
#![cfg(feature = "cuda-tests")]

use facerec_clustering::{
    cluster_statistics, cosine_kmeans, evaluate, finch, knn_graph_clusters, ClassClustering,
    FinchConfig, GraphConfig, Hardness, KMeansConfig,
};
use tch::{Device, Kind, Tensor};

#[test]
fn cuda_matches_cpu() {
    assert!(tch::Cuda::is_available(), "cuda-tests needs a CUDA device");
    tch::manual_seed(0);
    let centres = Tensor::randn([6, 24], (Kind::Float, Device::Cpu));
    let labels: Vec<i64> = (0..300).map(|i| i % 6).collect();
    let idx = Tensor::from_slice(&labels);
    let x =
        centres.index_select(0, &idx) + Tensor::randn([300, 24], (Kind::Float, Device::Cpu)) * 0.1;
    let g = x.to_device(Device::Cuda(0));
    let cfg = KMeansConfig {
        k: 6,
        ..Default::default()
    };
    let (a, b) = (cosine_kmeans(&x, &cfg), cosine_kmeans(&g, &cfg));
    assert_eq!(
        evaluate(&a.assignments, &b.assignments).unwrap().pairwise_f,
        1.0
    );
    let gc = GraphConfig::default();
    assert_eq!(knn_graph_clusters(&x, &gc), knn_graph_clusters(&g, &gc));
    assert_eq!(
        finch(&x, &FinchConfig::default()),
        finch(&g, &FinchConfig::default())
    );
    let (cl, hd) = (ClassClustering::default(), Hardness::default());
    let (s1, s2) = (
        cluster_statistics(&x, &labels, 6, cl, hd),
        cluster_statistics(&g, &labels, 6, cl, hd),
    );
    assert_eq!(s1.hardness, s2.hardness);
    assert!(s1
        .centres_cd
        .allclose(&s2.centres_cd.to_device(Device::Cpu), 1e-5, 1e-5, false));
}
