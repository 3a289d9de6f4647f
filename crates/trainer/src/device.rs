//! Device selection from the config string (`auto`, `cpu`, `cuda`, `cuda:N`).

use anyhow::{bail, Result};
use tch::Device;

/// Parse a device string. `auto` picks CUDA device 0 when libtorch sees one.
pub fn parse_device(spec: &str) -> Result<Device> {
    Ok(match spec {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        s => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Device::Cuda(n),
            None => bail!("unknown device `{s}` (expected auto, cpu, cuda or cuda:N)"),
        },
    })
}

/// Fail early and clearly when CUDA is asked for but libtorch cannot see it.
pub fn check_available(device: Device) -> Result<()> {
    if let Device::Cuda(n) = device {
        let count = tch::Cuda::device_count() as usize;
        if n >= count {
            bail!("train.device asks for cuda:{n}, but libtorch sees {count} CUDA device(s)");
        }
    }
    Ok(())
}
