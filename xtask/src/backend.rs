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
        if s.contains(',') {
            return Err(format!(
                "`{s}`: this command runs on one device (cpu, cuda or cuda:N); a list of GPUs (the model's layers split over them) is taken by eval, logits, prune, compare and recover"
            ));
        }
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

/// `--device` of the commands that can split a model's layers: one device, or several GPUs
/// (`cuda:0,cuda:1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceList {
    /// The Flex CPU backend.
    Cpu,
    /// These CUDA devices, in layer order.
    Cuda(Vec<usize>),
}

impl std::str::FromStr for DeviceList {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if let [one] = parts.as_slice() {
            return Ok(match one.parse::<DeviceChoice>()? {
                DeviceChoice::Cpu => DeviceList::Cpu,
                DeviceChoice::Cuda(i) => DeviceList::Cuda(vec![i]),
            });
        }
        let mut gpus = Vec::with_capacity(parts.len());
        for p in &parts {
            match p.parse::<DeviceChoice>()? {
                DeviceChoice::Cuda(i) if !gpus.contains(&i) => gpus.push(i),
                DeviceChoice::Cuda(i) => {
                    return Err(format!("`{s}` names cuda:{i} twice; list each GPU once"));
                }
                DeviceChoice::Cpu => {
                    return Err(format!(
                        "`{s}`: a list of devices is a list of GPUs (cuda:0,cuda:1); to keep layers in host memory use one GPU with --offload cpu"
                    ));
                }
            }
        }
        Ok(DeviceList::Cuda(gpus))
    }
}

/// `--offload WHERE`: where decoder layers wait between their turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Offload {
    /// Host memory: the checkpoint's memory map (pages the kernel can evict and read back), or
    /// the generator of a synthetic model.
    Cpu,
}

/// Work that runs on any backend, its model's layers split over one or more devices of it.
pub trait PlacedJob {
    /// Runs on backend `B` with `devices` (at least one, in layer order).
    fn run<B: Backend>(self, devices: Vec<B::Device>, device_name: String) -> Result<()>;
}

/// Runs `job` on the listed devices.
pub fn run_on_devices(list: &DeviceList, job: impl PlacedJob) -> Result<()> {
    match list {
        DeviceList::Cpu => job.run::<burn_flex::Flex>(vec![burn_flex::FlexDevice], cpu_name()),
        DeviceList::Cuda(indices) => run_cuda_list(indices, job),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda_list(indices: &[usize], job: impl PlacedJob) -> Result<()> {
    check_cuda_driver()?;
    check_cuda_devices(indices)?;
    let devices = indices
        .iter()
        .map(|&i| burn::backend::cuda::CudaDevice::new(i))
        .collect();
    let name = indices
        .iter()
        .map(|i| format!("cuda:{i}"))
        .collect::<Vec<_>>()
        .join(",");
    job.run::<burn::backend::Cuda>(devices, name)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda_list(_indices: &[usize], _job: impl PlacedJob) -> Result<()> {
    bail!("{NO_CUDA}")
}

/// Every listed GPU must exist: the backend would panic on the first use of a missing one.
#[cfg(feature = "cuda")]
fn check_cuda_devices(indices: &[usize]) -> Result<()> {
    use burn::tensor::backend::Backend as _;
    let count = std::panic::catch_unwind(|| <burn::backend::Cuda>::device_count(0)).unwrap_or(0);
    if let Some(i) = indices.iter().find(|&&i| i >= count) {
        bail!(
            "--device cuda:{i}: this machine has {count} CUDA device(s){}; list only those that exist",
            if count > 0 {
                format!(" (cuda:0 to cuda:{})", count - 1)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// Work that runs on any backend.
pub trait Job {
    /// Runs on backend `B`, device `device`.
    fn run<B: Backend>(self, device: B::Device, device_name: String) -> Result<()>;
}

/// Runs `job` on the chosen device.
pub fn run_on(choice: DeviceChoice, job: impl Job) -> Result<()> {
    match choice {
        DeviceChoice::Cpu => job.run::<burn_flex::Flex>(burn_flex::FlexDevice, cpu_name()),
        DeviceChoice::Cuda(index) => run_cuda(index, job),
    }
}

/// The CPU device's name in reports.
fn cpu_name() -> String {
    format!(
        "cpu (flex, {} threads; matrix products: {})",
        threads(),
        lopper_kernels::describe()
    )
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
    check_cuda_devices(&[index])?;
    let device = burn::backend::cuda::CudaDevice::new(index);
    job.run::<burn::backend::Cuda>(device, format!("cuda:{index}"))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_index: usize, _job: impl Job) -> Result<()> {
    bail!("{NO_CUDA}")
}

#[cfg(not(feature = "cuda"))]
const NO_CUDA: &str = "this build has no CUDA support; rebuild with `cargo xtask` replaced by `cargo run -p xtask --features cuda --` (or add `--features cuda`), or use --device cpu";

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
