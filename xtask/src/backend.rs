//! Backend choice: the only place that names burn backends.

use anyhow::{Result, bail};
use burn::tensor::backend::Backend;

/// `--device cpu|cuda[:N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The Flex CPU backend.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`: use cpu, cuda or cuda:N")),
        }
    }
}

/// Work that runs on any backend.
pub trait Job {
    /// Runs on backend `B`, device `device`.
    fn run<B: Backend>(self, device: B::Device, device_name: String) -> Result<()>;
}

/// Runs `job` on the chosen device.
pub fn run_on(choice: DeviceChoice, job: impl Job) -> Result<()> {
    match choice {
        DeviceChoice::Cpu => job.run::<burn_flex::Flex>(
            burn_flex::FlexDevice,
            format!(
                "cpu (flex, {} threads; matrix products: {})",
                threads(),
                lopper_kernels::describe()
            ),
        ),
        DeviceChoice::Cuda(index) => run_cuda(index, job),
    }
}

/// Whether backend `B` keeps its tensors in host memory (the CPU backend).
pub fn on_host<B: Backend>() -> bool {
    std::any::TypeId::of::<B::Device>() == std::any::TypeId::of::<burn_flex::FlexDevice>()
}

pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(feature = "cuda")]
fn run_cuda(index: usize, job: impl Job) -> Result<()> {
    check_cuda_driver()?;
    let device = burn::backend::cuda::CudaDevice::new(index);
    job.run::<burn::backend::Cuda>(device, format!("cuda:{index}"))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_index: usize, _job: impl Job) -> Result<()> {
    bail!(
        "this build has no CUDA support; rebuild with `cargo xtask` replaced by `cargo run -p xtask --features cuda --` (or add `--features cuda`), or use --device cpu"
    )
}

/// The CUDA backend loads the driver library lazily and panics when it is absent; check first.
#[cfg(feature = "cuda")]
fn check_cuda_driver() -> Result<()> {
    let found = ["libcuda.so.1", "libcuda.so"].iter().any(|name| {
        // SAFETY: loading the NVIDIA driver library runs its initialisers, which is what the
        // CUDA backend is about to do anyway; the handle is dropped at once.
        #[allow(unsafe_code)]
        unsafe {
            libloading::Library::new(name).is_ok()
        }
    });
    if !found {
        bail!(
            "--device cuda: the NVIDIA driver library (libcuda.so.1) was not found on this machine; install the driver or use --device cpu"
        );
    }
    Ok(())
}
