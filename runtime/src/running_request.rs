//! Which request's code an isolate is running, read when the CPU watchdog
//! samples it.
//!
//! One turn of an isolate's event loop runs the continuations of many
//! requests. To charge each its own CPU, the watchdog interrupts the isolate
//! at every sample; the interrupt reads V8's continuation-preserved data,
//! which bootstrap.js sets to a `RequestScope` for each request's handler
//! and which V8 carries into every promise continuation and timer made
//! while it runs.

use std::cell::RefCell;
use std::ffi::c_void;

use deno_core::{JsRuntime, v8};

use crate::limits::Interrupt;

/// What is called at each sample, on the isolate's thread, with the id of
/// the request whose code is running (0 for none: the runtime's own code,
/// or code that lost its request's context).
pub(crate) type OnSample = Box<dyn FnMut(u32)>;

/// Owned by its isolate, which it must outlive: interrupts point at it.
pub(crate) struct RequestSampler {
    context: v8::Global<v8::Context>,
    /// `RequestScope`'s own property holding the request id.
    key: v8::Global<v8::String>,
    /// "value", of a property descriptor.
    value_key: v8::Global<v8::String>,
    on_sample: RefCell<Option<OnSample>>,
}

impl RequestSampler {
    /// A sampler for `js`'s main context; samples are dropped until
    /// [`RequestSampler::set_handler`].
    pub(crate) fn new(js: &mut JsRuntime) -> Option<Box<RequestSampler>> {
        let context = js.main_context();
        let isolate = &mut *js.v8_isolate();
        v8::scope!(let scope, isolate);
        let name = |s: &[u8]| {
            let s = v8::String::new_from_one_byte(scope, s, v8::NewStringType::Internalized)?;
            Some(v8::Global::new(scope, s))
        };
        let key = name(b"atollRequest")?;
        let value_key = name(b"value")?;
        Some(Box::new(RequestSampler {
            context,
            key,
            value_key,
            on_sample: RefCell::new(None),
        }))
    }

    /// Sets what receives the samples.
    pub(crate) fn set_handler(&self, on_sample: OnSample) {
        *self.on_sample.borrow_mut() = Some(on_sample);
    }

    /// The interrupt the watchdog requests to take a sample.
    pub(crate) fn interrupt(&self) -> Interrupt {
        Interrupt {
            callback: on_interrupt,
            data: std::ptr::from_ref(self).cast_mut().cast::<c_void>(),
        }
    }

    /// Reads the running request's id. Runs between two steps of JS, so it
    /// must not run any: no getters, no proxy traps.
    fn running(&self, isolate: &mut v8::Isolate) -> u32 {
        v8::scope!(let scope, isolate);
        let context = v8::Local::new(scope, &self.context);
        let scope = &mut v8::ContextScope::new(scope, context);
        let data = scope.get_continuation_preserved_embedder_data();
        if data.is_proxy() {
            return 0;
        }
        let Ok(scope_object) = v8::Local::<v8::Object>::try_from(data) else {
            return 0;
        };
        let key = v8::Local::new(scope, &self.key);
        // A descriptor, not a property read: an accessor is not called.
        let Some(descriptor) = scope_object.get_own_property_descriptor(scope, key.into()) else {
            return 0;
        };
        let Ok(descriptor) = v8::Local::<v8::Object>::try_from(descriptor) else {
            return 0;
        };
        // The descriptor is a fresh plain object whose own properties are
        // data; only a missing one would be looked up on its prototype.
        let value_key = v8::Local::new(scope, &self.value_key);
        if descriptor.has_own_property(scope, value_key.into()) != Some(true) {
            return 0;
        }
        descriptor
            .get(scope, value_key.into())
            .and_then(|v| v8::Local::<v8::Uint32>::try_from(v).ok())
            .map_or(0, |v| v.value())
    }
}

/// The watchdog's interrupt: runs on the isolate's thread.
unsafe extern "C" fn on_interrupt(mut isolate: v8::UnsafeRawIsolatePtr, data: *mut c_void) {
    // SAFETY: `data` is the `RequestSampler` of this isolate (see
    // `RequestSampler::interrupt`), which outlives it; V8 passes the
    // isolate it interrupts, on the thread running it.
    let sampler = unsafe { &*data.cast_const().cast::<RequestSampler>() };
    let isolate = unsafe { v8::Isolate::ref_from_raw_isolate_ptr_mut(&mut isolate) };
    let id = sampler.running(isolate);
    // Busy only if a sample's handler were re-entered; that sample is dropped.
    if let Ok(mut on_sample) = sampler.on_sample.try_borrow_mut()
        && let Some(f) = on_sample.as_mut()
    {
        f(id);
    }
}
