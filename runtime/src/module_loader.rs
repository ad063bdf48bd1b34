//! Serves a tenant's modules from its bundle; nothing else is loadable.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use atoll_protocol::{Bundle, ModuleKind};
use deno_core::error::ModuleLoaderError;
use deno_core::{
    ModuleLoadOptions, ModuleLoadReferrer, ModuleLoadResponse, ModuleLoader, ModuleSource,
    ModuleSourceCode, ModuleSpecifier, ModuleType, ResolutionKind,
};
use deno_error::JsErrorBox;

/// A module pooled isolates boot before any tenant owns them (see
/// bootstrap.js's `warmUpBoot`); served only while no bundle is assigned.
/// It stays in the isolate's module map, so the tenant that later owns the
/// isolate could import it too: it holds nothing and reaches nothing.
const WARM_UP_SPECIFIER: &str = "atoll:warm-up";
const WARM_UP_MODULE: deno_core::FastStaticString =
    deno_core::ascii_str!("export default { fetch() { return new Response(''); } };\n");

/// Module loader of one isolate. Starts empty (pre-booted isolates belong
/// to nobody) and is given its bundle when the isolate is assigned.
#[derive(Default)]
pub(crate) struct BundleLoader {
    bundle: RefCell<Option<Arc<Bundle>>>,
}

impl BundleLoader {
    pub(crate) fn assign(&self, bundle: Arc<Bundle>) {
        *self.bundle.borrow_mut() = Some(bundle);
    }
}

impl ModuleLoader for BundleLoader {
    fn resolve(
        &self,
        specifier: &str,
        referrer: &str,
        _kind: ResolutionKind,
    ) -> Result<ModuleSpecifier, ModuleLoaderError> {
        deno_core::resolve_import(specifier, referrer).map_err(JsErrorBox::from_err)
    }

    fn load(
        &self,
        specifier: &ModuleSpecifier,
        _referrer: Option<&ModuleLoadReferrer>,
        _options: ModuleLoadOptions,
    ) -> ModuleLoadResponse {
        let bundle = self.bundle.borrow();
        if bundle.is_none() && specifier.as_str() == WARM_UP_SPECIFIER {
            return ModuleLoadResponse::Sync(Ok(ModuleSource::new(
                ModuleType::JavaScript,
                ModuleSourceCode::String(WARM_UP_MODULE.into()),
                specifier,
                None,
            )));
        }
        let found = bundle
            .as_ref()
            .and_then(|b| b.modules.get(specifier.as_str()));
        ModuleLoadResponse::Sync(match found {
            Some(m) => {
                let ty = match m.kind {
                    ModuleKind::Js => ModuleType::JavaScript,
                    ModuleKind::Json => ModuleType::Json,
                };
                Ok(ModuleSource::new(
                    ty,
                    ModuleSourceCode::String(m.code.clone().into()),
                    specifier,
                    None,
                ))
            }
            None => Err(JsErrorBox::type_error(format!(
                "module {specifier} is not part of this deployment's bundle"
            ))),
        })
    }

    fn get_source_map(&self, file_name: &str) -> Option<Cow<'_, [u8]>> {
        let bundle = self.bundle.borrow();
        let map = bundle
            .as_ref()?
            .modules
            .get(file_name)?
            .source_map
            .as_ref()?;
        Some(Cow::Owned(map.as_bytes().to_vec()))
    }
}
