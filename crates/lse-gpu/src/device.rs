//! Adapters and the device context.

use std::sync::OnceLock;

use cubecl::prelude::*;
use cubecl::wgpu::{wgpu, WgpuDevice, WgpuDeviceKind, WgpuRuntime};
use cubecl_runtime::runtime::Runtime;

use crate::Error;

/// One adapter wgpu finds on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adapter {
    /// The driver's name for it (`llvmpipe (LLVM 15.0.6, 256 bits)`, `NVIDIA H100 …`).
    pub name: String,
    /// The graphics API it is reached through (`Vulkan`, `Metal`, …).
    pub backend: String,
    /// Discrete, integrated, virtual GPU or CPU (a software rasterizer such as llvmpipe).
    pub device_type: String,
    kind: WgpuDeviceKind,
    api: cubecl::wgpu::WgpuBackend,
}

/// The adapters on this machine, asked once per process (the Vulkan loader must not see
/// instances come and go on several threads).
pub fn adapters() -> &'static [Adapter] {
    static ADAPTERS: OnceLock<Vec<Adapter>> = OnceLock::new();
    ADAPTERS.get_or_init(|| {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::all(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let found = cubecl::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let mut seen: Vec<(wgpu::Backend, wgpu::DeviceType)> = Vec::new();
        found
            .iter()
            .map(|a| a.get_info())
            .map(|info| {
                // The index of an adapter among those of its type on its API: how CubeCL names it.
                let index = seen
                    .iter()
                    .filter(|s| **s == (info.backend, info.device_type))
                    .count();
                seen.push((info.backend, info.device_type));
                let kind = match info.device_type {
                    wgpu::DeviceType::DiscreteGpu => WgpuDeviceKind::DiscreteGpu(index),
                    wgpu::DeviceType::IntegratedGpu => WgpuDeviceKind::IntegratedGpu(index),
                    wgpu::DeviceType::VirtualGpu => WgpuDeviceKind::VirtualGpu(index),
                    wgpu::DeviceType::Cpu | wgpu::DeviceType::Other => WgpuDeviceKind::Cpu,
                };
                let api = match info.backend {
                    wgpu::Backend::Vulkan => cubecl::wgpu::WgpuBackend::Vulkan,
                    wgpu::Backend::Metal => cubecl::wgpu::WgpuBackend::Metal,
                    wgpu::Backend::Dx12 => cubecl::wgpu::WgpuBackend::Dx12,
                    wgpu::Backend::Gl => cubecl::wgpu::WgpuBackend::Gl,
                    _ => cubecl::wgpu::WgpuBackend::Auto,
                };
                Adapter {
                    name: info.name.clone(),
                    backend: format!("{:?}", info.backend),
                    device_type: format!("{:?}", info.device_type),
                    kind,
                    api,
                }
            })
            .collect()
    })
}

/// A GPU to run the kernels on: a CubeCL client, of one wgpu adapter or one that another crate
/// opened ([`Gpu::from_client`]).
#[derive(Clone)]
pub struct Gpu {
    pub(crate) client: Client,
    adapter: Option<Adapter>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.adapter)
            .finish()
    }
}

impl Gpu {
    /// The first adapter of [`adapters`].
    ///
    /// # Errors
    /// [`Error::NoAdapter`] when wgpu finds none (no Vulkan driver: install Mesa's
    /// `mesa-vulkan-drivers` for the software one).
    ///
    /// # Panics
    /// When CubeCL cannot open a device on an adapter wgpu listed.
    pub fn new() -> Result<Self, Error> {
        Self::with_adapter(0)
    }

    /// Adapter `index` of [`adapters`].
    ///
    /// # Errors
    /// [`Error::NoAdapter`] when there is no adapter `index`.
    ///
    /// # Panics
    /// When CubeCL cannot open a device on an adapter wgpu listed.
    pub fn with_adapter(index: usize) -> Result<Self, Error> {
        let list = adapters();
        let adapter = list.get(index).cloned().ok_or(Error::NoAdapter {
            index,
            found: list.len(),
        })?;
        let device = WgpuDevice::new(adapter.kind.clone()).on(adapter.api);
        let client = <WgpuRuntime as Runtime>::client(&device);
        Ok(Self {
            client,
            adapter: Some(adapter),
        })
    }

    /// The kernels on a CubeCL client another crate opened (burn's CubeCL backends: wgpu, CUDA,
    /// ROCm), so that they run on that crate's buffers ([`Gpu::cross_entropy_resident`]).
    pub fn from_client(client: Client) -> Self {
        Self {
            client,
            adapter: None,
        }
    }

    /// "adapter (API)", or what opened the client.
    pub fn describe(&self) -> String {
        match &self.adapter {
            Some(a) => format!("{} ({})", a.name, a.backend),
            None => "a CubeCL client opened by another crate".to_string(),
        }
    }

    /// The wgpu adapter this context runs on; `None` for a [`Gpu::from_client`].
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }
}
