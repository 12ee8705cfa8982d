// Shows on the node the text it sent with its results (the `text` of its "executed" message, which
// ComfyUI's ui.PreviewText fills): the auto-caption, the prompt Image to Layers used, the files Load Image
// Folder skipped, the file a save node wrote, the layer tree Select Layer and Load Layered PSD read (with what the
// PSD reader warned of), the recompose PSNR. The text sits in a read-only box the user can select and copy; it is
// neither saved in the workflow nor sent with the prompt.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES_WITH_TEXT = new Set([
  "QwenLayeredCaption",
  "QwenLayeredImageToLayers",
  "QwenLayeredLoadImageFolder",
  "QwenLayeredSavePSD",
  "QwenLayeredSaveLayerPNGs",
  "QwenLayeredSelectLayer",
  "QwenLayeredLoadLayeredPSD",
  "QwenLayeredRecomposePSNR",
]);
const WIDGET = "shown_text";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not in the workflow's widgets_values
    widget.options.serialize = false; // not in the prompt
    if (widget.inputEl) widget.inputEl.readOnly = true;
  }
  widget.value = text;
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  app.graph.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "QwenLayered.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES_WITH_TEXT.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showText(this, message.text.join("\n"));
    };
  },
});
