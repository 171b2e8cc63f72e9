//! The element type a model's weights are stored in.

use serde::{Deserialize, Serialize};

/// Storage type of a model's weight matrices (projections, embedding, LM head). Norm scales,
/// biases, activations and every reduction stay f32; a product of a bf16/f16 weight reads its
/// activations rounded to the same type and accumulates in f32 (what mixed-precision autocast
/// does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit IEEE float.
    #[default]
    F32,
    /// bfloat16: f32's range, 8 bits of mantissa.
    Bf16,
    /// IEEE half: 11 bits of mantissa, range up to 65504.
    F16,
}

impl Dtype {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// Every type, in the order the command line lists them.
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::Bf16, Dtype::F16];

    /// The name the command line takes (`f32`, `bf16`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Dtype {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(Dtype::F16),
            _ => Err(crate::Error::Invalid(format!(
                "unknown dtype `{s}`: use f32, bf16 or f16"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for d in Dtype::ALL {
            assert_eq!(d.name().parse::<Dtype>().unwrap(), d);
        }
        assert_eq!("bfloat16".parse::<Dtype>().unwrap(), Dtype::Bf16);
        let e = "f8".parse::<Dtype>().unwrap_err().to_string();
        assert!(e.contains("f8") && e.contains("bf16"), "{e}");
        assert_eq!(Dtype::Bf16.bytes() * 2, Dtype::F32.bytes());
    }
}
