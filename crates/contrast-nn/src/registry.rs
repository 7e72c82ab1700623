//! The registry of methods and encoders: what `method.name` and
//! `model.encoder` may name. The built-in ones are listed here, one line each;
//! a program (or a test) adds its own with [`register_method`] and
//! [`register_encoder`], through the same lists. [`Registry`] is the
//! [`Catalog`] that [`contrast_config::Plan::resolve`] consults.

use crate::encoder::{self, EncoderEntry};
use crate::method::{self, MethodEntry};
use crate::{NnError, Result};
use contrast_config::{Catalog, EncoderSpec, MethodSpec};
use std::sync::{LazyLock, RwLock};

static METHODS: LazyLock<RwLock<Vec<MethodEntry>>> = LazyLock::new(|| {
    RwLock::new(vec![
        method::simclr::ENTRY,
        method::clip::ENTRY,
        method::moco::ENTRY,
        method::byol::ENTRY,
        method::simsiam::ENTRY,
        method::instdisc::ENTRY,
        method::barlow_twins::ENTRY,
        method::swav::ENTRY,
        method::deepcluster::ENTRY,
        method::cpc::ENTRY,
        method::simcse::ENTRY,
        method::quick_thought::ENTRY,
        method::pba::ENTRY,
    ])
});

static ENCODERS: LazyLock<RwLock<Vec<EncoderEntry>>> = LazyLock::new(|| {
    let mut all = vec![encoder::convnet::ENTRY];
    all.extend(encoder::resnet::ENTRIES);
    all.extend(encoder::vit::ENTRIES);
    RwLock::new(all)
});

/// Register a method; its name must be new.
pub fn register_method(entry: MethodEntry) -> Result<()> {
    let mut all = METHODS.write().expect("method registry");
    if all.iter().any(|m| m.spec.name() == entry.spec.name()) {
        return Err(NnError::Param(format!("method `{}` is registered already", entry.spec.name())));
    }
    all.push(entry);
    Ok(())
}

/// Register an encoder; its name must be new.
pub fn register_encoder(entry: EncoderEntry) -> Result<()> {
    let mut all = ENCODERS.write().expect("encoder registry");
    if all.iter().any(|e| e.spec.name() == entry.spec.name()) {
        return Err(NnError::Param(format!("encoder `{}` is registered already", entry.spec.name())));
    }
    all.push(entry);
    Ok(())
}

/// The method named `name`.
pub fn method_entry(name: &str) -> Option<MethodEntry> {
    METHODS.read().expect("method registry").iter().find(|m| m.spec.name() == name).copied()
}

/// The encoder named `name`.
pub fn encoder_entry(name: &str) -> Option<EncoderEntry> {
    ENCODERS.read().expect("encoder registry").iter().find(|e| e.spec.name() == name).copied()
}

/// Every registered method and encoder, as a [`Catalog`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Registry;

impl Catalog for Registry {
    fn methods(&self) -> Vec<&'static dyn MethodSpec> {
        METHODS.read().expect("method registry").iter().map(|m| m.spec).collect()
    }

    fn encoders(&self) -> Vec<&'static dyn EncoderSpec> {
        ENCODERS.read().expect("encoder registry").iter().map(|e| e.spec).collect()
    }
}
