-- PACS auto-routing for cxr-ai (Orthanc Lua, "LuaScripts" in orthanc.json).
--
-- Forwards every CR / DX image that Orthanc stores to the cxr-ai listener, declared in
-- orthanc.json as the DICOM modality "cxr-ai". Results that cxr-ai sends back (SR, heatmap
-- SC, Parametric Map) are not images of those modalities and are never forwarded, and
-- nothing that cxr-ai itself stored is sent back to it, so there is no loop.
--
-- Each instance is forwarded by an asynchronous Orthanc job (visible under /jobs), so
-- Orthanc keeps receiving while it forwards; cxr-ai groups instances into studies itself
-- (association release + quiet period), so per-instance forwarding is fine.

local TARGET = 'cxr-ai'        -- key in DicomModalities
local CXR_AI_AET = 'CXR_AI'    -- cxr-ai's AE title: its own results are never sent back

local MODALITIES = { CR = true, DX = true }
local SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.1'] = true,      -- Computed Radiography Image Storage
  ['1.2.840.10008.5.1.4.1.1.1.1'] = true,    -- Digital X-Ray Image Storage - For Presentation
  ['1.2.840.10008.5.1.4.1.1.1.1.1'] = true,  -- Digital X-Ray Image Storage - For Processing
}

function OnStoredInstance(instanceId, tags, metadata, origin)
  if not MODALITIES[tags['Modality'] or ''] then
    return
  end
  local sopClass = metadata['SopClassUid'] or ''
  if sopClass ~= '' and not SOP_CLASSES[sopClass] then
    return
  end
  if metadata['RemoteAET'] == CXR_AI_AET then
    return
  end
  local body = DumpJson({ Resources = { instanceId }, Asynchronous = true }, true)
  RestApiPost('/modalities/' .. TARGET .. '/store', body)
end
