//! Which regions serve which inference model, compiled once per snapshot: a model id is an
//! index, and each model carries a `Vec<bool>` indexed by region, so the request path filters
//! candidate regions with no allocation.

use std::collections::HashMap;

use meridian_config::Config;

/// Index into [`ModelTable::models`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelId(pub u16);

pub struct CompiledModel {
    pub name: String,
    /// Indexed by region index: does this region serve the model?
    pub served_by: Vec<bool>,
    /// Region names serving the model, in config order (for `GET /v1/models`).
    pub regions: Vec<String>,
}

#[derive(Default)]
pub struct ModelTable {
    /// Sorted by name.
    pub models: Vec<CompiledModel>,
    by_name: HashMap<String, ModelId>,
}

impl ModelTable {
    pub fn compile(config: &Config) -> Self {
        let mut names: Vec<&str> = config
            .regions
            .iter()
            .flat_map(|r| r.models.iter().map(String::as_str))
            .collect();
        names.sort_unstable();
        names.dedup();
        let models: Vec<CompiledModel> = names
            .iter()
            .map(|&name| CompiledModel {
                name: name.to_string(),
                served_by: config
                    .regions
                    .iter()
                    .map(|r| r.models.iter().any(|m| m == name))
                    .collect(),
                regions: config
                    .regions
                    .iter()
                    .filter(|r| r.models.iter().any(|m| m == name))
                    .map(|r| r.name.clone())
                    .collect(),
            })
            .collect();
        let mut by_name: HashMap<String, ModelId> = models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), ModelId(i as u16)))
            .collect();
        for (alias, target) in &config.inference.aliases {
            if let Some(&id) = by_name.get(target) {
                by_name.entry(alias.clone()).or_insert(id);
            }
        }
        Self { models, by_name }
    }

    /// A model name or alias as the client wrote it (exact match).
    pub fn resolve(&self, name: &str) -> Option<ModelId> {
        self.by_name.get(name).copied()
    }

    pub fn get(&self, id: ModelId) -> Option<&CompiledModel> {
        self.models.get(usize::from(id.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_and_aliases_resolve_to_their_regions() {
        let config = Config::from_toml_str(include_str!("../../../examples/local.toml"))
            .expect("local.toml");
        let table = ModelTable::compile(&config);
        let max = table.resolve("qwen-max").expect("qwen-max");
        let model = table.get(max).expect("model");
        assert_eq!(model.regions, ["ap-southeast-1", "eu-central-1"]);
        assert_eq!(
            table.resolve("qwen"),
            table.resolve("qwen-plus"),
            "alias from [inference]"
        );
        assert_eq!(table.resolve("gpt-nope"), None);
    }
}
